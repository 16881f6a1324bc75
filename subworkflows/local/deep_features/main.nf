// Stage "deep_features" (--deep_weights and/or --ssl_encoder): per batch, DP__ columns from
// EfficientNet-B0, then SSL__ columns from the encoder (a folder, or trained here on the models'
// training split with --ssl_encoder train); the batch tables merged in batch order replace
// features/single_cells.parquet, as `morphotype run` does.

include { MORPHOTYPE_DEEP_FEATURES as DEEP_FEATURES_DP  } from '../../../modules/local/deep_features'
include { MORPHOTYPE_DEEP_FEATURES as DEEP_FEATURES_SSL } from '../../../modules/local/deep_features'
include { MORPHOTYPE_ENCODER_TRAIN                      } from '../../../modules/local/encoder_train'
include { MORPHOTYPE_MERGE as MERGE_DEEP_FEATURES       } from '../../../modules/local/merge'

workflow DEEP_FEATURES {
    take:
    ch_batches        // channel: [ val(meta), path(batch samplesheet), [ path(image), ... ] ]
    ch_batch_features // channel: [ val(meta), path(batch table) ]
    ch_features       // channel: [ val(meta), path(single_cells.parquet) ]
    deep_weights      // value: path(EfficientNet-B0 weights), or []
    ssl_encoder       // value: path(encoder folder), 'train', or []

    main:
    ch_images = ch_batches.map { meta, _sheet, images -> [meta, images] }
    ch_tables = ch_batch_features
    ch_merged = ch_features
    if (deep_weights) {
        DEEP_FEATURES_DP(ch_tables.join(ch_images), ['weights', deep_weights])
        ch_tables = DEEP_FEATURES_DP.out.features
    }
    if (ssl_encoder) {
        ch_encoder = channel.value(['encoder', ssl_encoder])
        if (ssl_encoder == 'train') {
            // One task on the whole table (its held-out cells are left out) and every image.
            MORPHOTYPE_ENCODER_TRAIN(
                ch_features
                    .map { _meta, table -> [[id: 'encoder'], table] }
                    .combine(ch_images.map { _meta, images -> images }.collect().map { images -> [images] })
            )
            ch_encoder = MORPHOTYPE_ENCODER_TRAIN.out.encoder.map { _meta, encoder -> ['encoder', encoder] }.first()
        }
        DEEP_FEATURES_SSL(ch_tables.join(ch_images), ch_encoder)
        ch_tables = DEEP_FEATURES_SSL.out.features
    }
    if (deep_weights || ssl_encoder) {
        MERGE_DEEP_FEATURES(
            ch_tables
                .toSortedList { a, b -> a[0].batch <=> b[0].batch }
                .map { batches -> [[id: 'single_cells'], batches.collect { batch -> batch[1] }] }
        )
        ch_merged = MERGE_DEEP_FEATURES.out.table
    }

    emit:
    features = ch_merged // channel: [ val(meta), path(single_cells.parquet) ], with the deep columns when asked
}
