process MORPHOTYPE_FEATURES {
    tag "${meta.id}"
    label 'process_medium'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(samplesheet), path(images, stageAs: 'images/*'), path(masks, stageAs: 'masks/*')

    output:
    tuple val(meta), path("${prefix}.parquet"), emit: features
    tuple val(meta), path("${prefix}.unmatched.csv"), emit: unmatched
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    morphotype features --samplesheet ${samplesheet} --masks masks --out ${prefix}.parquet --workers ${task.cpus} ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    [[ "${samplesheet}" == *.csv && "${masks}" == *.mask.tiff* ]] || { echo "stub: expected a samplesheet and masks, got ${samplesheet} / ${masks}" >&2; exit 1; }
    touch ${prefix}.parquet
    echo 'Metadata_FileID,Metadata_ImageID,reason,distance' > ${prefix}.unmatched.csv
    """
}
