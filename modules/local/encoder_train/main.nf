// The in-domain self-supervised nucleus encoder, trained on the models' training split only.
process MORPHOTYPE_ENCODER_TRAIN {
    tag "${meta.id}"
    label 'process_high'
    label 'process_gpu'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-deep:0.1.0'

    input:
    tuple val(meta), path(features), path(images, stageAs: 'images/*')

    output:
    tuple val(meta), path("${prefix}"), emit: encoder
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    morphotype encoder train --features ${features} --images images --outdir ${prefix} --workers ${task.cpus} ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    mkdir -p ${prefix}
    touch ${prefix}/encoder.json ${prefix}/encoder.pt
    """
}
