// Stage "jump" (--jump_plates): one MORPHOTYPE_JUMP_SCORE task per plate with the trained models,
// then one MORPHOTYPE_JUMP_SUMMARISE across the plates (jump/plates/, jump/summary/ as `morphotype run`).

include { MORPHOTYPE_JUMP_SCORE     } from '../../../modules/local/jump_score'
include { MORPHOTYPE_JUMP_SUMMARISE } from '../../../modules/local/jump_summarise'

workflow JUMP {
    take:
    ch_plates // channel: path(plate SQLite), one per plate, or empty
    ch_models // channel: [ val(meta), path(models) ] from TRAIN

    main:
    MORPHOTYPE_JUMP_SCORE(
        ch_plates.map { plate -> [[id: plate.baseName], plate] },
        ch_models.map { _meta, models -> models }.first()
    )
    MORPHOTYPE_JUMP_SUMMARISE(
        MORPHOTYPE_JUMP_SCORE.out.plate
            .toSortedList { a, b -> a[0].id <=> b[0].id }
            .filter { plates -> plates }
            .map { plates -> [[id: 'summary'], plates.collect { plate -> plate[1] }, plates.collectMany { plate -> plate[2] instanceof List ? plate[2] : [plate[2]] }] }
    )

    emit:
    summary = MORPHOTYPE_JUMP_SUMMARISE.out.summary // channel: [ val(meta), path(summary) ], or empty
}
