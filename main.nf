#!/usr/bin/env nextflow
/*
 * morphotype: single-cell phenotypes from nucleus morphology.
 *
 *   nextflow run main.nf -profile docker -params-file examples/mitocheck_crops.yaml --outdir results
 *
 * Same steps, params file and output layout as `morphotype run PARAMS.yaml`. This entry workflow
 * is the only place that reads params: it validates them (nextflow_schema.json, and the
 * samplesheet against assets/schema_input.json) and hands channels and values to MORPHOTYPE.
 */

include { validateParameters; paramsSummaryLog } from 'plugin/nf-schema'
include { MORPHOTYPE                           } from './workflows/morphotype'

workflow {
    main:
    validateParameters()
    log.info(paramsSummaryLog(workflow))
    if (params.input && params.mitocheck_crops || !params.input && !params.mitocheck_crops) {
        error("Give exactly one of --input (a samplesheet CSV) or --mitocheck_crops (a folder of MitoCheck crops)")
    }

    MORPHOTYPE(
        params.input ? channel.fromPath(params.input, checkIfExists: true) : channel.empty(),
        params.mitocheck_crops ? channel.fromPath(params.mitocheck_crops, type: 'dir', checkIfExists: true) : channel.empty(),
        params.batch_size,
        params.cellpose_models_dir ? file(params.cellpose_models_dir, checkIfExists: true) : []
    )

    // Every task's (process, tool, version), as pipeline_info/software_versions.yml.
    channel.topic('versions')
        .unique()
        .map { process_name, tool, version -> "${process_name.tokenize(':').last()}:\n  ${tool}: ${version}\n" }
        .collectFile(storeDir: "${params.outdir}/pipeline_info", name: 'software_versions.yml', sort: true, cache: false)
}
