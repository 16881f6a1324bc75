// Stage "train": one MORPHOTYPE_TRAIN task per feature space, then (with LOIO) one MORPHOTYPE_LOIO
// task per feature space and chunk of images, then one MORPHOTYPE_EVALUATE that joins the models
// and writes every evaluation table: the same models and tables as `morphotype train`.

include { MORPHOTYPE_TRAIN    } from '../../../modules/local/train'
include { MORPHOTYPE_LOIO     } from '../../../modules/local/loio'
include { MORPHOTYPE_EVALUATE } from '../../../modules/local/evaluate'

workflow TRAIN {
    take:
    ch_features    // channel: [ val(meta), path(single_cells.parquet) ], or empty (no models)
    feature_spaces // value: [ feature space, ... ] in params order
    loio           // value: leave-one-image-out on or off
    loio_spaces    // value: [ feature space, ... ] with LOIO ([]: every one)
    loio_chunks    // value: LOIO tasks per feature space

    main:
    ch_spaces = ch_features.flatMap { _meta, table ->
        feature_spaces.withIndex().collect { space, index -> [[id: space, space: space, index: index], table] }
    }
    MORPHOTYPE_TRAIN(ch_spaces)

    ch_chunks = MORPHOTYPE_TRAIN.out.models
        .join(ch_spaces)
        .filter { meta, _models, _table -> loio && (!loio_spaces || meta.space in loio_spaces) }
        .flatMap { meta, models, table ->
            (0..<loio_chunks).collect { chunk -> [meta + [id: "${meta.space}.loio_${chunk}".toString(), chunk: chunk, chunks: loio_chunks], table, models] }
        }
    MORPHOTYPE_LOIO(ch_chunks)

    // Models folders in feature-space order, LOIO chunks in (feature space, chunk) order.
    ch_models = MORPHOTYPE_TRAIN.out.models
        .toSortedList { a, b -> a[0].index <=> b[0].index }
        .map { spaces -> [spaces.collect { space -> space[1] }] }
    ch_loio = MORPHOTYPE_LOIO.out.predictions
        .toSortedList { a, b -> a[0].index <=> b[0].index ?: a[0].chunk <=> b[0].chunk }
        .map { chunks -> [chunks.collect { chunk -> chunk[1] }] }
    MORPHOTYPE_EVALUATE(
        ch_features
            .map { _meta, table -> [[id: 'evaluation'], table] }
            .combine(ch_models)
            .combine(ch_loio)
    )

    emit:
    models     = MORPHOTYPE_EVALUATE.out.models     // channel: [ val(meta), path(models) ]
    evaluation = MORPHOTYPE_EVALUATE.out.evaluation // channel: [ val(meta), path(evaluation) ]
}
