process MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS {
    tag "${meta.id}"
    label 'process_single'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(crops_dir)

    output:
    tuple val(meta), path("${prefix}.csv"), emit: samplesheet
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    morphotype samplesheet mitocheck-crops ${crops_dir} --out ${prefix}.csv ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    // One row whose "image" is a file that exists, so that a stub run flows through every step.
    """
    echo 'image,plate,well,site,frame' > ${prefix}.csv
    echo "\$(readlink -f ${crops_dir}/manifest.csv),stub,1,1,0" >> ${prefix}.csv
    """
}
