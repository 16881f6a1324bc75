// Models of one feature space: multinomial elastic-net logistic regression (+ shuffled, one-vs-rest); evaluation follows in MORPHOTYPE_EVALUATE.
process MORPHOTYPE_TRAIN {
    tag "${meta.id}"
    label 'process_high'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(features)

    output:
    tuple val(meta), path("models"), emit: models
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    // One feature space per task (meta.space); a space absent from the table gives no model
    // (models/training.json lists it under skipped_feature_spaces), not an error.
    """
    morphotype train --features ${features} --outdir . --feature-spaces ${meta.space} --no-evaluation --workers ${task.cpus} ${args}
    """

    stub:
    """
    [[ "${features}" == *.parquet ]] || { echo "stub: expected a table, got ${features}" >&2; exit 1; }
    mkdir -p models/${meta.space}__balanced
    echo 'Metadata_CellID,split' > models/cell_splits.csv
    echo '{}' > models/training.json
    """
}
