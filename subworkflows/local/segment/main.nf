// Stage "segment": one MORPHOTYPE_SEGMENT task per batch, then the batch summaries merged in
// batch order (segmentation/<file_id>.mask.tiff + segmentation_summary.csv, as `morphotype run`).

include { MORPHOTYPE_SEGMENT                             } from '../../../modules/local/segment'
include { MORPHOTYPE_MERGE as MERGE_SEGMENTATION_SUMMARY } from '../../../modules/local/merge'

workflow SEGMENT {
    take:
    ch_batches // channel: [ val(meta), path(batch samplesheet), [ path(image), ... ] ]
    models_dir // value: path(Cellpose weights folder), or [] (threshold backend, or weights in the image)

    main:
    MORPHOTYPE_SEGMENT(ch_batches, models_dir)
    MERGE_SEGMENTATION_SUMMARY(
        MORPHOTYPE_SEGMENT.out.summary
            .toSortedList { a, b -> a[0].batch <=> b[0].batch }
            .map { batches -> [[id: 'segmentation_summary'], batches.collect { batch -> batch[1] }] }
    )

    emit:
    masks   = MORPHOTYPE_SEGMENT.out.masks          // channel: [ val(meta), [ path(<file_id>.mask.tiff), ... ] ]
    summary = MERGE_SEGMENTATION_SUMMARY.out.table  // channel: [ val(meta), path(segmentation_summary.csv) ]
}
