/*
 * MORPHOTYPE: the stages of morphotype.run.STAGES, in that order, one subworkflow each.
 * Params are read by the entry workflow (main.nf) only; here everything arrives through take:.
 * A stage that is off gets empty channels (its processes never run).
 */

include { SAMPLESHEET   } from '../subworkflows/local/samplesheet'
include { STREAM        } from '../subworkflows/local/stream'
include { SEGMENT       } from '../subworkflows/local/segment'
include { FEATURES      } from '../subworkflows/local/features'
include { DEEP_FEATURES } from '../subworkflows/local/deep_features'
include { TRAIN         } from '../subworkflows/local/train'
include { JUMP          } from '../subworkflows/local/jump'
include { REPORT        } from '../subworkflows/local/report'

workflow MORPHOTYPE {
    take:
    ch_input         // channel: path(samplesheet.csv), or empty
    ch_crops         // channel: path(MitoCheck crops folder), or empty
    ch_idr_plates    // channel: [ plate, ... ] ([]: every labelled plate), or empty
    idr              // value: true with IDR plates (frames streamed by STREAM)
    movies_per_batch // value: whole IDR movies per STREAM task
    batch_size       // value: images per SEGMENT / FEATURES / DEEP_FEATURES task
    models_dir       // value: path(Cellpose weights folder), or []
    deep_weights     // value: path(EfficientNet-B0 weights), or []
    ssl_encoder      // value: path(encoder folder), 'train', or []
    train_models     // value: train and evaluate the models
    feature_spaces   // value: [ feature space, ... ]
    loio             // value: leave-one-image-out on or off
    loio_spaces      // value: [ feature space, ... ] with LOIO ([]: every one)
    loio_chunks      // value: LOIO tasks per feature space
    ch_jump_plates   // channel: path(plate SQLite), one per plate, or empty
    ch_run_info      // channel: [ path(params.yaml), path(versions.json) ]
    report           // value: write the HTML report

    main:
    SAMPLESHEET(ch_input, ch_crops, ch_idr_plates)
    STREAM(SAMPLESHEET.out.samplesheet, idr, movies_per_batch, batch_size)
    SEGMENT(STREAM.out.batches, models_dir)
    FEATURES(STREAM.out.batches, SEGMENT.out.masks)
    DEEP_FEATURES(STREAM.out.batches, FEATURES.out.batch_features, FEATURES.out.features, deep_weights, ssl_encoder)
    TRAIN(train_models ? DEEP_FEATURES.out.features : channel.empty(), feature_spaces, loio, loio_spaces, loio_chunks)
    JUMP(ch_jump_plates, TRAIN.out.models)
    REPORT(
        ch_run_info,
        report ? DEEP_FEATURES.out.features : channel.empty(),
        TRAIN.out.models,
        TRAIN.out.evaluation,
        JUMP.out.summary
    )

    emit:
    samplesheet          = SAMPLESHEET.out.samplesheet
    frames               = STREAM.out.frames
    masks                = SEGMENT.out.masks
    segmentation_summary = SEGMENT.out.summary
    features             = DEEP_FEATURES.out.features
    unmatched            = FEATURES.out.unmatched
    models               = TRAIN.out.models
    evaluation           = TRAIN.out.evaluation
    jump_summary         = JUMP.out.summary
    report               = REPORT.out.report
}
