// The HTML report of a run, from its published pieces staged in the outdir layout.
process MORPHOTYPE_REPORT {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(run_info, stageAs: 'run/pipeline_info/*'), path(features, stageAs: 'run/features/*'), path(models, stageAs: 'run/*'), path(evaluation, stageAs: 'run/*'), path(jump_summary, stageAs: 'run/jump/*')

    output:
    tuple val(meta), path("${prefix}"), emit: report
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    // run/ is laid out like outdir: pipeline_info/, features/, models/, evaluation/, jump/summary/
    """
    morphotype report run --report-dir ${prefix} ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    mkdir -p ${prefix}/figures
    touch ${prefix}/index.html
    """
}
