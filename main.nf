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
    def sources = [params.input, params.mitocheck_crops, params.idr_plates].findAll { source -> source }
    if (sources.size() != 1) {
        error("Give exactly one of --input (a samplesheet CSV), --mitocheck_crops (a folder of MitoCheck crops) or --idr_plates (idr0013-screenA plates, or 'all')")
    }
    if (params.jump_plates && !params.train_models) {
        error("--jump_plates scores the plates with this run's models: it needs --train_models true")
    }

    MORPHOTYPE(
        params.input ? channel.fromPath(params.input, checkIfExists: true) : channel.empty(),
        params.mitocheck_crops ? channel.fromPath(params.mitocheck_crops, type: 'dir', checkIfExists: true) : channel.empty(),
        params.idr_plates ? channel.of(params.idr_plates == 'all' ? [] : names(params.idr_plates)) : channel.empty(),
        params.idr_plates ? true : false,
        params.idr_movies_per_batch,
        params.batch_size,
        params.cellpose_models_dir ? file(params.cellpose_models_dir, checkIfExists: true) : [],
        params.deep_weights ? file(params.deep_weights, checkIfExists: true) : [],
        !params.ssl_encoder ? [] : params.ssl_encoder == 'train' ? 'train' : file(params.ssl_encoder, type: 'dir', checkIfExists: true),
        params.train_models,
        names(params.feature_spaces),
        params.loio,
        names(params.loio_feature_spaces),
        params.loio_chunks,
        params.jump_plates ? channel.of(jumpPlates(file(params.jump_plates, checkIfExists: true))).flatten() : channel.empty(),
        runInfo(params, workflow.manifest.version),
        params.report
    )

    // Every task's (process, tool, version), as pipeline_info/software_versions.yml.
    channel.topic('versions')
        .unique()
        .map { process_name, tool, version -> "${process_name.tokenize(':').last()}:\n  ${tool}: ${version}\n" }
        .collectFile(storeDir: "${params.outdir}/pipeline_info", name: 'software_versions.yml', sort: true, cache: false)
}

// Comma-separated names as a list ('' or null: []).
def names(value) {
    return value ? value.toString().tokenize(',').collect { name -> name.trim() }.findAll { name -> name } : []
}

// The plates of a --jump_plates file: one SQLite path or URL per line (blank lines and # comments ignored).
def jumpPlates(listing) {
    def plates = listing.readLines().collect { line -> line.trim() }.findAll { line -> line && !line.startsWith('#') }
    if (!plates) {
        error("--jump_plates ${listing} lists no plate (expected one SQLite path or URL per line)")
    }
    return plates.collect { plate -> file(plate, checkIfExists: true) }
}

/*
 * pipeline_info/params.yaml and versions.json, as `morphotype run` writes them (the report reads
 * both): every param of morphotype.run.PARAM_DEFAULTS as YAML, and the pipeline version.
 */
def runInfo(Map all_params, version) {
    // Infrastructure-only params (morphotype.run.INFRASTRUCTURE_PARAMS) are not in params.yaml.
    def infrastructure = ['cellpose_models_dir', 'loio_chunks', 'publish_dir_mode', 'slurm_queue', 'slurm_cluster_options', 'aws_queue', 'aws_region', 'aws_workdir']
    def science = all_params.findAll { name, _value -> !(name in infrastructure) }
    def lines = science.keySet().toList().sort().collect { name -> "${name}: ${yamlValue(science[name])}" }
    def params_yaml = channel.of(lines.join('\n') + '\n').collectFile(name: 'params.yaml', storeDir: "${all_params.outdir}/pipeline_info", cache: false)
    def versions_json = channel.of("{\n  \"morphotype\": \"${version}\"\n}\n").collectFile(name: 'versions.json', storeDir: "${all_params.outdir}/pipeline_info", cache: false)
    return params_yaml.concat(versions_json).collect()
}

// A scalar param as YAML: null, true/false, a number, or a double-quoted string.
def yamlValue(value) {
    if (value == null || value instanceof Boolean || value instanceof Number) {
        return "${value == null ? 'null' : value}"
    }
    return '"' + value.toString().replace('\\', '\\\\').replace('"', '\\"') + '"'
}
