/*
 * MORPHOTYPE: the stages of morphotype.run.STAGES, in that order, one subworkflow each.
 * Params are read by the entry workflow (main.nf) only; here everything arrives through take:.
 */

include { SAMPLESHEET } from '../subworkflows/local/samplesheet'
include { SEGMENT     } from '../subworkflows/local/segment'
include { FEATURES    } from '../subworkflows/local/features'

workflow MORPHOTYPE {
    take:
    ch_input   // channel: path(samplesheet.csv), or empty
    ch_crops   // channel: path(MitoCheck crops folder), or empty
    batch_size // value: images per SEGMENT / FEATURES task
    models_dir // value: path(Cellpose weights folder), or []

    main:
    SAMPLESHEET(ch_input, ch_crops, batch_size)
    SEGMENT(SAMPLESHEET.out.batches, models_dir)
    FEATURES(SAMPLESHEET.out.batches, SEGMENT.out.masks)

    emit:
    samplesheet          = SAMPLESHEET.out.samplesheet
    masks                = SEGMENT.out.masks
    segmentation_summary = SEGMENT.out.summary
    features             = FEATURES.out.features
    unmatched            = FEATURES.out.unmatched
}
