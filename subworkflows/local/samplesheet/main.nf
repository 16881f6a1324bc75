// Stage "samplesheet": the samplesheet given (--input), built from a crops folder
// (--mitocheck_crops), or listing idr0013-screenA movie frames on the IDR (--idr_plates).
// STREAM then fetches remote frames and cuts the samplesheet into batches of whole images.

include { MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS } from '../../../modules/local/samplesheet_mitocheckcrops'
include { MORPHOTYPE_SAMPLESHEET_IDR            } from '../../../modules/local/samplesheet_idr'

workflow SAMPLESHEET {
    take:
    ch_input      // channel: path(samplesheet.csv), or empty
    ch_crops      // channel: path(MitoCheck crops folder), or empty
    ch_idr_plates // channel: [ plate, ... ] ([]: every labelled plate), or empty

    main:
    MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS(ch_crops.map { crops -> [[id: 'samplesheet'], crops] })
    MORPHOTYPE_SAMPLESHEET_IDR(ch_idr_plates.map { plates -> [[id: 'samplesheet'], plates] })
    ch_samplesheet = ch_input
        .mix(MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS.out.samplesheet.map { _meta, sheet -> sheet })
        .mix(MORPHOTYPE_SAMPLESHEET_IDR.out.samplesheet.map { _meta, sheet -> sheet })

    emit:
    samplesheet = ch_samplesheet // channel: path(samplesheet.csv)
}
