process MORPHOTYPE_SEGMENT {
    tag "${meta.id}"
    label 'process_medium'
    label 'process_gpu'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-segmentation:0.1.0'

    input:
    tuple val(meta), path(samplesheet), path(images, stageAs: 'images/*')
    path models_dir

    output:
    tuple val(meta), path("*.mask.tiff"), emit: masks
    tuple val(meta), path("${prefix}.segmentation_summary.csv"), emit: summary
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    // Cellpose weights come from a staged folder, never from the internet.
    def weights = models_dir ? "export CELLPOSE_LOCAL_MODELS_PATH=\"\$PWD/${models_dir}\"" : ''
    """
    ${weights}
    morphotype segment --samplesheet ${samplesheet} --outdir . --workers ${task.cpus} ${args}
    mv segmentation_summary.csv ${prefix}.segmentation_summary.csv
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}.mask.tiff
    echo 'file_id,image,objects' > ${prefix}.segmentation_summary.csv
    """
}
