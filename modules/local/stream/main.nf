// Movie frames of a batch of whole movies from the IDR, illumination-corrected (ic) or raw (no_ic), as TIFFs.
process MORPHOTYPE_STREAM {
    tag "${meta.id}"
    label 'process_low'

    conda "${moduleDir}/environment.yml"
    container 'ghcr.io/morphotype/morphotype-base:0.1.0'

    input:
    tuple val(meta), path(samplesheet)

    output:
    tuple val(meta), path("${prefix}.csv"), path("frames/**.tiff"), emit: frames
    tuple val("${task.process}"), val('morphotype'), eval('morphotype --version | sed "s/morphotype //"'), topic: versions, emit: versions_morphotype

    script:
    def args = task.ext.args ?: ''
    prefix = task.ext.prefix ?: "${meta.id}.frames"
    // The frame cache is the task folder: frames/<variant>/<plate>/<plate>_<well>_<site>_<frame>.tiff;
    // whole movies only pass through its scratch (emptied after each batch of movies).
    """
    morphotype stream --samplesheet ${samplesheet} --cache . --out ${prefix}.csv --fetch-workers ${task.cpus} ${args}
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}.frames"
    """
    mkdir -p frames/ic/stub
    touch frames/ic/stub/stub_${meta.batch}_1_0.tiff
    echo 'image,plate,well,site,frame' > ${prefix}.csv
    echo "\$PWD/frames/ic/stub/stub_${meta.batch}_1_0.tiff,stub,${meta.batch},1,0" >> ${prefix}.csv
    """
}
