// One CellProfiler output (SQLite, CytoTable Parquet, or a folder of ExportToSpreadsheet CSVs) scored with a
// phenotype model: per-well KS statistics, profiles and domain_shift.json (morphotype score).
process MORPHOTYPE_SCORE {
    tag "${meta.id}"
    label 'process_medium'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(cellprofiler_output)
    path(models)
    path(platemap)

    output:
    tuple val(meta), path("*.summary.json"), path("*.parquet"), path("*.domain_shift.json"), emit: plate
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    // ext.args: --model models/<score_model>__final [--shuffled-model ...] [--dna-stain ...] [--fill-missing]
    """
    morphotype score --input ${cellprofiler_output} --platemap ${platemap} --outdir . ${args}
    """

    stub:
    """
    echo '{}' > ${meta.id}.summary.json
    echo '{}' > ${meta.id}.domain_shift.json
    touch ${meta.id}.ks.parquet ${meta.id}.profiles.parquet
    """
}
