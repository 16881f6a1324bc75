// Stage "report": the published pieces staged in the outdir layout (pipeline_info/, features/,
// models/, evaluation/, jump/summary/), then one MORPHOTYPE_REPORT (report/ as `morphotype run`).

include { MORPHOTYPE_REPORT } from '../../../modules/local/report'

workflow REPORT {
    take:
    ch_run_info     // channel: [ path(params.yaml), path(versions.json) ]
    ch_features     // channel: [ val(meta), path(single_cells.parquet) ], or empty (no report)
    ch_models       // channel: [ val(meta), path(models) ], or empty
    ch_evaluation   // channel: [ val(meta), path(evaluation) ], or empty
    ch_jump_summary // channel: [ val(meta), path(summary) ], or empty

    main:
    MORPHOTYPE_REPORT(
        ch_features
            .map { _meta, table -> [[id: 'report'], [table]] }
            .combine(ch_run_info.map { files -> [files] })
            .map { meta, table, info -> [meta, info, table] }
            .combine(ch_models.map { _meta, models -> [models] }.ifEmpty([[]]))
            .combine(ch_evaluation.map { _meta, evaluation -> [evaluation] }.ifEmpty([[]]))
            .combine(ch_jump_summary.map { _meta, summary -> [summary] }.ifEmpty([[]]))
    )

    emit:
    report = MORPHOTYPE_REPORT.out.report // channel: [ val(meta), path(report) ]
}
