// Stage "features": one MORPHOTYPE_FEATURES task per batch (its images and masks), then the
// single-cell tables and unmatched-annotation reports merged in batch order.

include { MORPHOTYPE_FEATURES                } from '../../../modules/local/features'
include { MORPHOTYPE_MERGE as MERGE_FEATURES  } from '../../../modules/local/merge'
include { MORPHOTYPE_MERGE as MERGE_UNMATCHED } from '../../../modules/local/merge'

workflow FEATURES {
    take:
    ch_batches // channel: [ val(meta), path(batch samplesheet), [ path(image), ... ] ]
    ch_masks   // channel: [ val(meta), [ path(<file_id>.mask.tiff), ... ] ]

    main:
    MORPHOTYPE_FEATURES(ch_batches.join(ch_masks))
    MERGE_FEATURES(inBatchOrder(MORPHOTYPE_FEATURES.out.features, 'single_cells'))
    MERGE_UNMATCHED(inBatchOrder(MORPHOTYPE_FEATURES.out.unmatched, 'unmatched'))

    emit:
    batch_features = MORPHOTYPE_FEATURES.out.features // channel: [ val(meta), path(batch_00000.parquet) ]
    features       = MERGE_FEATURES.out.table  // channel: [ val(meta), path(single_cells.parquet) ]
    unmatched      = MERGE_UNMATCHED.out.table // channel: [ val(meta), path(single_cells.unmatched.csv) ]
}

// Per-batch [meta, file] items gathered into one [[id: id], [files in batch order]].
def inBatchOrder(ch_items, String id) {
    return ch_items
        .toSortedList { a, b -> a[0].batch <=> b[0].batch }
        .map { items -> [[id: id], items.collect { item -> item[1] }] }
}
