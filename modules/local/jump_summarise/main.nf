// Enrichment across the scored JUMP plates.
process MORPHOTYPE_JUMP_SUMMARISE {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(summaries), path(tables)

    output:
    tuple val(meta), path("${prefix}"), emit: summary
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    morphotype jump summarise --outdir ${prefix} ${args} ${summaries}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    mkdir -p ${prefix}
    echo '{}' > ${prefix}/summary.json
    """
}
