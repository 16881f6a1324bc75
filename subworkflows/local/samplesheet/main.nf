// Stage "samplesheet": the samplesheet given (--input) or built from a crops folder
// (--mitocheck_crops), cut into batches of whole images: the fan-out unit of later stages.

include { MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS } from '../../../modules/local/samplesheet_mitocheckcrops'

workflow SAMPLESHEET {
    take:
    ch_input   // channel: path(samplesheet.csv), or empty
    ch_crops   // channel: path(MitoCheck crops folder), or empty
    batch_size // value: images per batch

    main:
    MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS(ch_crops.map { crops -> [[id: 'samplesheet'], crops] })
    ch_samplesheet = ch_input.mix(MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS.out.samplesheet.map { _meta, sheet -> sheet })

    ch_batch_rows = ch_samplesheet
        .splitCsv(header: true, quote: '"')
        .toList()
        .flatMap { rows -> samplesheetBatches(rows, batch_size) }
    ch_batch_sheets = ch_batch_rows
        .collectFile { meta, text, _images -> ["${meta.id}.csv", text] }
        .map { sheet -> [sheet.baseName, sheet] }
    ch_batches = ch_batch_rows
        .map { meta, _text, images -> [meta.id, meta, images] }
        .join(ch_batch_sheets)
        .map { _id, meta, images, sheet -> [meta, sheet, images] }

    emit:
    samplesheet = ch_samplesheet // channel: path(samplesheet.csv)
    batches     = ch_batches     // channel: [ val(meta), path(batch samplesheet), [ path(image), ... ] ]
}

/*
 * Samplesheet rows (maps, in file order) grouped by image and cut into batches of `size` images.
 * Returns one [meta, csv text, image files] per batch, meta = [id: 'batch_00000', batch: 0, images: n].
 * A batch's CSV has the samplesheet's columns, with `image` naming where the task stages the
 * file (images/<file name>): the step reads staged files, so remote images (s3, http) work too.
 */
def samplesheetBatches(List rows, int size) {
    if (!rows) {
        error("The samplesheet has no rows")
    }
    def rowsByImage = rows.groupBy { row -> row.image }
    def images = rowsByImage.keySet().toList()
    def stagedName = images.collectEntries { image -> [image, file(image).name] }
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
        [meta, lines.join('\n') + '\n', batchImages.collect { image -> file(image) }]
    }
}

// One CSV line; fields holding a comma, quote or line break are quoted (RFC 4180).
def csvLine(List fields) {
    return fields.collect { field ->
        def text = field == null ? '' : field.toString()
        text.contains(',') || text.contains('"') || text.contains('\n') || text.contains('\r') ? '"' + text.replace('"', '""') + '"' : text
    }.join(',')
}
