process MORPHOTYPE_MERGE {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(tables)

    output:
    tuple val(meta), path("${prefix}.${suffix}"), emit: table
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    suffix = task.ext.suffix ?: 'parquet'
    // Tables are concatenated in the order given: the caller sorts them (by batch).
    """
    morphotype merge --out ${prefix}.${suffix} ${args} ${tables}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    suffix = task.ext.suffix ?: 'parquet'
    """
    touch ${prefix}.${suffix}
    """
}
