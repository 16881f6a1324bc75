// One JUMP plate scored with a final model and its shuffled baseline: per-well KS statistics and profiles.
process MORPHOTYPE_JUMP_SCORE {
    tag "${meta.id}"
    label 'process_medium'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(sqlite)
    path(models)

    output:
    tuple val(meta), path("*.summary.json"), path("*.parquet"), emit: plate
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    // ext.args names the model: --model models/<jump_model>__final --shuffled-model models/<jump_model>__shuffled
    """
    morphotype jump score --sqlite ${sqlite} --outdir . ${args}
    """

    stub:
    """
    echo '{}' > ${meta.id}.summary.json
    touch ${meta.id}.ks.parquet ${meta.id}.profiles.parquet
    """
}
