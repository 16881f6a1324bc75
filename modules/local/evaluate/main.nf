// The feature spaces' models joined into one models folder, and every evaluation table.
process MORPHOTYPE_EVALUATE {
    tag "${meta.id}"
    label 'process_medium'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(features), path(models, stageAs: 'space??/*'), path(loio, stageAs: 'loio/*')

    output:
    tuple val(meta), path("models"), emit: models
    tuple val(meta), path("evaluation"), emit: evaluation
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    // models: the feature spaces' folders in feature-space order (space01/models, space02/models, ...)
    def loio_option = loio ? "--loio ${loio}" : ''
    """
    morphotype evaluate --features ${features} --models ${models} ${loio_option} --outdir . --workers ${task.cpus} ${args}
    """

    stub:
    """
    for folder in ${models}; do [[ -d "\$folder" ]] || { echo "stub: expected models folders, got ${models}" >&2; exit 1; }; done
    [[ "${features}" == *.parquet ]] || { echo "stub: expected a table, got ${features}" >&2; exit 1; }
    mkdir -p models evaluation
    echo 'Metadata_CellID,split' > models/cell_splits.csv
    echo '{}' > evaluation/summary.json
    """
}
