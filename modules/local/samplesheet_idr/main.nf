// The samplesheet of idr0013-screenA movie frames (labelled frames and drawn control frames); images are remote movie frames (<movie URL>#frame=<t>), fetched by MORPHOTYPE_STREAM.
process MORPHOTYPE_SAMPLESHEET_IDR {
    tag "${meta.id}"
    label 'process_single'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), val(plates)

    output:
    tuple val(meta), path("${prefix}.csv"), emit: samplesheet
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    // No plate named: every idr0013-screenA plate with labelled cells.
    def plate_option = plates ? "--plates ${plates.join(' ')}" : ''
    """
    morphotype samplesheet idr ${plate_option} --out ${prefix}.csv ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    echo 'image,plate,well,site,frame' > ${prefix}.csv
    echo 'https://idr.example/stub/00001_01.ch5#frame=0,stub,1,1,0' >> ${prefix}.csv
    """
}
