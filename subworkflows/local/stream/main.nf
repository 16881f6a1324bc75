// Stage "stream" (--idr_plates only): one MORPHOTYPE_STREAM task per batch of whole movies
// writes their frames as TIFFs; the rows then point at those frame files. Every samplesheet is
// then cut into batches of whole images: the fan-out unit of the later stages.

include { MORPHOTYPE_STREAM                } from '../../../modules/local/stream'
include { MORPHOTYPE_MERGE as MERGE_FRAMES } from '../../../modules/local/merge'

workflow STREAM {
    take:
    ch_samplesheet   // channel: path(samplesheet.csv)
    idr              // value: true when the samplesheet lists remote IDR movie frames
    movies_per_batch // value: whole movies per MORPHOTYPE_STREAM task
    batch_size       // value: images per SEGMENT / FEATURES task

    main:
    ch_rows = ch_samplesheet
        .splitCsv(header: true, quote: '"')
        .toList()
    ch_frames = channel.empty()
    if (idr) {
        ch_movie_rows = ch_rows.flatMap { rows -> movieBatches(rows, movies_per_batch) }
        ch_movie_sheets = ch_movie_rows
            .collectFile { meta, text -> ["${meta.id}.csv", text] }
            .map { sheet -> [sheet.baseName, sheet] }
        MORPHOTYPE_STREAM(
            ch_movie_rows
                .map { meta, _text -> [meta.id, meta] }
                .join(ch_movie_sheets)
                .map { _id, meta, sheet -> [meta, sheet] }
        )
        // Each row's image: the frame file the task wrote (staged by name into later tasks).
        ch_rows = MORPHOTYPE_STREAM.out.frames
            .splitCsv(header: true, quote: '"', elem: 1)
            .map { meta, row, frames -> [meta.batch, localFrame(row, frames)] }
            .toSortedList { a, b -> a[0] <=> b[0] }
            .map { items -> items.collect { item -> item[1] } }
        MERGE_FRAMES(
            MORPHOTYPE_STREAM.out.frames
                .toSortedList { a, b -> a[0].batch <=> b[0].batch }
                .map { batches -> [[id: 'frames'], batches.collect { batch -> batch[1] }] }
        )
        ch_frames = MERGE_FRAMES.out.table
    }

    ch_batch_rows = ch_rows.flatMap { rows -> samplesheetBatches(rows, batch_size) }
    ch_batch_sheets = ch_batch_rows
        .collectFile { meta, text, _images -> ["${meta.id}.csv", text] }
        .map { sheet -> [sheet.baseName, sheet] }
    ch_batches = ch_batch_rows
        .map { meta, _text, images -> [meta.id, meta, images] }
        .join(ch_batch_sheets)
        .map { _id, meta, images, sheet -> [meta, sheet, images] }

    emit:
    batches = ch_batches // channel: [ val(meta), path(batch samplesheet), [ path(image), ... ] ]
    frames  = ch_frames  // channel: [ val(meta), path(frames.csv) ], or empty
}

/*
 * Samplesheet rows of remote movie frames (image = <movie URL>#frame=<t>) grouped by movie and
 * cut into batches of `size` whole movies. Returns one [meta, csv text] per batch,
 * meta = [id: 'movies_00000', batch: 0, movies: n].
 */
def movieBatches(List rows, int size) {
    if (!rows) {
        error("The samplesheet has no rows")
    }
    def rowsByMovie = rows.groupBy { row -> row.image.tokenize('#')[0] }
    def header = rows[0].keySet().toList()
    return rowsByMovie.keySet().toList().collate(size).withIndex().collect { movies, index ->
        def lines = [csvLine(header)]
        movies.each { movie ->
            rowsByMovie[movie].each { row -> lines << csvLine(header.collect { column -> row[column] }) }
        }
        def meta = [id: "movies_${index.toString().padLeft(5, '0')}".toString(), batch: index, movies: movies.size()]
        [meta, lines.join('\n') + '\n']
    }
}

// A row of MORPHOTYPE_STREAM's samplesheet with `image` the frame file it names, among the task's frames.
def localFrame(Map row, frames) {
    def byName = (frames instanceof List ? frames : [frames]).collectEntries { frame -> [frame.name, frame] }
    def name = row.image.tokenize('/')[-1]
    if (!byName.containsKey(name)) {
        error("MORPHOTYPE_STREAM wrote no frame ${name} (row ${row})")
    }
    return row + [image: byName[name]]
}

/*
 * Samplesheet rows (maps, in file order) grouped by image and cut into batches of `size` images.
 * Returns one [meta, csv text, image files] per batch, meta = [id: 'batch_00000', batch: 0, images: n].
 * A batch's CSV has the samplesheet's columns, with `image` naming where the task stages the
 * file (images/<file name>): the step reads staged files, so remote images (s3, http) work too.
 * An image is a path or URL (from a samplesheet) or a file (a frame written by MORPHOTYPE_STREAM).
 */
def samplesheetBatches(List rows, int size) {
    if (!rows) {
        error("The samplesheet has no rows")
    }
    def rowsByImage = rows.groupBy { row -> row.image }
    def images = rowsByImage.keySet().toList()
    def imageFile = images.collectEntries { image -> [image, image instanceof CharSequence ? file(image.toString()) : image] }
    def stagedName = images.collectEntries { image -> [image, imageFile[image].name] }
    def clashes = stagedName.values().countBy { name -> name }.findAll { _name, count -> count > 1 }
    if (clashes) {
        error("Image file names must be unique in a samplesheet (each task stages a batch of images by name); repeated: ${clashes.keySet().take(5).join(', ')}")
    }
    def header = rows[0].keySet().toList()
    return images.collate(size).withIndex().collect { batchImages, index ->
        def lines = [csvLine(header)]
        batchImages.each { image ->
            rowsByImage[image].each { row ->
                lines << csvLine(header.collect { column -> column == 'image' ? "images/${stagedName[image]}" : row[column] })
            }
        }
        // a String, not a GString: ids are join keys
        def meta = [id: "batch_${index.toString().padLeft(5, '0')}".toString(), batch: index, images: batchImages.size()]
        [meta, lines.join('\n') + '\n', batchImages.collect { image -> imageFile[image] }]
    }
}

// One CSV line; fields holding a comma, quote or line break are quoted (RFC 4180).
def csvLine(List fields) {
    return fields.collect { field ->
        def text = field == null ? '' : field.toString()
        text.contains(',') || text.contains('"') || text.contains('\n') || text.contains('\r') ? '"' + text.replace('"', '""') + '"' : text
    }.join(',')
}
