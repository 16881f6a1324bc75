// Leave-one-image-out predictions for one chunk of the images, with one feature space's multiclass models.
process MORPHOTYPE_LOIO {
    tag "${meta.id}"
    label 'process_high'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(features), path(models)

    output:
    tuple val(meta), path("${prefix}.parquet"), emit: predictions
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    morphotype loio --features ${features} --models ${models} --chunk ${meta.chunk} --chunks ${meta.chunks} --out ${prefix}.parquet --workers ${task.cpus} ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    [[ "${features}" == *.parquet && -d "${models}" ]] || { echo "stub: expected a table and a models folder, got ${features} / ${models}" >&2; exit 1; }
    touch ${prefix}.parquet
    """
}
