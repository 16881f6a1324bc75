// Deep features of a batch's cells: DP__ (EfficientNet-B0 weights) or SSL__ (encoder) columns added to its table.
process MORPHOTYPE_DEEP_FEATURES {
    tag "${meta.id}"
    label 'process_medium'
    label 'process_gpu'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-deep:0.1.0'

    input:
    tuple val(meta), path(features), path(images, stageAs: 'images/*')
    tuple val(model_kind), path(model)

    output:
    tuple val(meta), path("${prefix}.parquet"), emit: features
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}.${model_kind}"
    // model_kind: 'weights' (EfficientNet-B0 file: DP__ columns) or 'encoder' (encoder folder: SSL__ columns)
    """
    morphotype deep-features --features ${features} --${model_kind} ${model} --images images --out ${prefix}.parquet --workers ${task.cpus} ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}.${model_kind}"
    """
    [[ "${features}" == *.parquet && "${images}" == images/* ]] || { echo "stub: expected a table and images, got ${features} / ${images}" >&2; exit 1; }
    touch ${prefix}.parquet
    """
}
