//! `cliper batch merge OUT`: the finished inputs' sessions as two Parquet
//! tables that pandas, polars, DuckDB and Spark read directly.
//!
//! - `faces.parquet`: one row per frame x face, the columns of
//!   `session.csv` (same names, same order) after `input` and `input_id`.
//! - `inputs.parquet`: one row per input of the work list: outcome
//!   (complete, partial, failed, pending), frames, faces, tracks, duration,
//!   processing time, the share of face rows per predicted expression, and
//!   the error or warnings.
//!
//! Rows follow the work list's order, then the frames' order, so merging
//! the same folder twice writes the same bytes. Both files are written under
//! a temporary name and renamed.

use std::fs::File;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use crate::model::cliper::expressions::BankLayout;
use crate::session::meta::SessionMeta;
use crate::session::record::FrameRecord;
use crate::session::JSONL_FILE;

use super::task::read_result;
use super::{read_status, read_work_list, BatchError, Outcome, FACES_TABLE, INPUTS_TABLE};

/// Rows per Parquet row group: bounds the memory a merge holds.
const ROW_GROUP: usize = 65_536;

/// What a merge wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeSummary {
    pub inputs: usize,
    pub complete: usize,
    pub partial: usize,
    pub failed: usize,
    /// Inputs with no result yet (not processed, or still running).
    pub pending: usize,
    /// Rows of faces.parquet.
    pub rows: u64,
    pub faces_table: PathBuf,
    pub inputs_table: PathBuf,
}

impl MergeSummary {
    /// Whether every input has an outcome (none is still pending).
    pub fn whole(&self) -> bool {
        self.pending == 0
    }
}

/// Merges the results in `out` into `to` (default: `out` itself).
pub fn merge(out: &Path, to: Option<&Path>) -> Result<MergeSummary, BatchError> {
    let items = read_work_list(out)?;
    let to = to.unwrap_or(out);
    std::fs::create_dir_all(to).map_err(|e| BatchError::write(to, e))?;
    let status = read_status(out)?;
    let faces_path = to.join(FACES_TABLE);
    let inputs_path = to.join(INPUTS_TABLE);
    // The columns are the classes of the model the inputs were scored
    // with (all of them, first seen first, should reruns have used models
    // of other classes: a class an input's model lacks reads NaN there).
    let mut classes: Vec<String> = Vec::new();
    for item in &items {
        if let Ok(meta) = SessionMeta::read(&out.join(&item.id)) {
            for c in meta.classes {
                if !classes.contains(&c) {
                    classes.push(c);
                }
            }
        }
    }
    if classes.is_empty() {
        classes = BankLayout::cliper().classes().to_vec();
    }
    let n = classes.len();
    let mut faces = Table::create(&faces_path, "faces", faces_columns(&classes))?;
    let mut inputs = Table::create(&inputs_path, "inputs", inputs_columns(&classes))?;
    let mut summary = MergeSummary {
        inputs: items.len(),
        faces_table: faces_path.clone(),
        inputs_table: inputs_path.clone(),
        ..Default::default()
    };
    for item in &items {
        let dir = out.join(&item.id);
        let key = Cell::Str(item.key.clone());
        let id = Cell::Str(item.id.clone());
        if dir.is_dir() {
            let result = read_result(&dir)?;
            let mut predicted = vec![0u64; n];
            let mut rows = 0u64;
            for record in read_records(&dir)? {
                for f in &record.faces {
                    predicted[f.predicted_index(&classes).min(n - 1)] += 1;
                    rows += 1;
                    let [x, y, w, h] = f.bbox;
                    let mut row = vec![
                        key.clone(),
                        id.clone(),
                        Cell::F64(record.t),
                        Cell::I64(record.frame as i64),
                        Cell::I64(f.id as i64),
                        Cell::I32(x as i32),
                        Cell::I32(y as i32),
                        Cell::I32(w as i32),
                        Cell::I32(h as i32),
                        Cell::Str(f.predicted.clone()),
                    ];
                    row.extend(f.probs(&classes).into_iter().map(Cell::F32));
                    row.extend(f.scores(&classes).into_iter().map(Cell::F32));
                    for extra in [&f.dynamic, &f.smoothed] {
                        match extra {
                            Some(s) => row.extend(s.probs(&classes).into_iter().map(Cell::F32)),
                            None => row.extend((0..n).map(|_| Cell::Null)),
                        }
                    }
                    row.push(Cell::Str(record.wall.clone()));
                    faces.row(row)?;
                }
            }
            summary.rows += rows;
            match result.of.outcome {
                Outcome::Partial => summary.partial += 1,
                _ => summary.complete += 1,
            }
            let mut row = vec![
                key,
                id,
                Cell::Str(result.of.path.clone()),
                Cell::Str(result.of.outcome.as_str().into()),
                Cell::I64(result.of.frames as i64),
                Cell::I64(rows as i64),
                Cell::I64(result.tracks as i64),
                Cell::F64(result.duration_s),
                Cell::F64(result.seconds),
            ];
            row.extend(predicted.iter().map(|&n| match rows {
                0 => Cell::Null,
                _ => Cell::F32(n as f32 / rows as f32),
            }));
            row.push(Cell::I64(result.warnings.len() as i64));
            row.push(Cell::Null);
            row.push(text_or_null(result.warnings.join("; ")));
            row.push(Cell::Str(result.task.clone()));
            row.push(Cell::Str(result.host.clone()));
            inputs.row(row)?;
            continue;
        }
        // No result: the newest thing a task said about it.
        let last = status
            .iter()
            .filter(|s| s.of.id == item.id && !matches!(s.of.outcome, Outcome::Skipped))
            .max_by(|a, b| a.time.cmp(&b.time));
        let (outcome, error, task) = match last {
            Some(s) if s.of.outcome == Outcome::Failed => {
                summary.failed += 1;
                ("failed", s.error.clone(), Some(s.task.clone()))
            }
            _ => {
                summary.pending += 1;
                ("pending", None, None)
            }
        };
        let mut row = vec![
            key,
            id,
            Cell::Str(item.path.display().to_string()),
            Cell::Str(outcome.into()),
            Cell::I64(0),
            Cell::I64(0),
            Cell::I64(0),
            Cell::Null,
            Cell::Null,
        ];
        row.extend((0..n).map(|_| Cell::Null));
        row.push(Cell::I64(0));
        row.push(error.map_or(Cell::Null, Cell::Str));
        row.push(Cell::Null);
        row.push(task.map_or(Cell::Null, Cell::Str));
        row.push(Cell::Null);
        inputs.row(row)?;
    }
    faces.finish()?;
    inputs.finish()?;
    Ok(summary)
}

fn text_or_null(s: String) -> Cell {
    if s.is_empty() {
        Cell::Null
    } else {
        Cell::Str(s)
    }
}

/// The frames of a finished input's session.jsonl.
fn read_records(dir: &Path) -> Result<impl Iterator<Item = FrameRecord>, BatchError> {
    let path = dir.join(JSONL_FILE);
    let file = File::open(&path).map_err(|e| BatchError::read(&path, e))?;
    let mut records = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| BatchError::read(&path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: FrameRecord = serde_json::from_str(&line)
            .map_err(|e| BatchError::read(&path, format!("line {}: {e}", n + 1)))?;
        records.push(r);
    }
    Ok(records.into_iter())
}

/// The columns of faces.parquet: `input`, `input_id`, then session.csv's.
pub fn faces_columns(classes: &[String]) -> Vec<ColumnDef> {
    let mut cols = vec![
        ColumnDef::new("input", Kind::Utf8),
        ColumnDef::new("input_id", Kind::Utf8),
        ColumnDef::new("t", Kind::F64),
        ColumnDef::new("frame", Kind::I64),
        ColumnDef::new("face_id", Kind::I64),
    ];
    for c in ["x", "y", "w", "h"] {
        cols.push(ColumnDef::new(c, Kind::I32));
    }
    cols.push(ColumnDef::new("predicted", Kind::Utf8));
    cols.extend(classes.iter().map(|c| ColumnDef::new(c, Kind::F32)));
    cols.extend(
        classes
            .iter()
            .map(|c| ColumnDef::new(&format!("score_{c}"), Kind::F32)),
    );
    for prefix in ["dynamic", "smoothed"] {
        cols.extend(
            classes
                .iter()
                .map(|c| ColumnDef::optional(&format!("{prefix}_{c}"), Kind::F32)),
        );
    }
    cols.push(ColumnDef::new("wall", Kind::Utf8));
    cols
}

/// The columns of inputs.parquet.
pub fn inputs_columns(classes: &[String]) -> Vec<ColumnDef> {
    let mut cols = vec![
        ColumnDef::new("input", Kind::Utf8),
        ColumnDef::new("input_id", Kind::Utf8),
        ColumnDef::new("path", Kind::Utf8),
        ColumnDef::new("outcome", Kind::Utf8),
        ColumnDef::new("frames", Kind::I64),
        ColumnDef::new("faces", Kind::I64),
        ColumnDef::new("tracks", Kind::I64),
        ColumnDef::optional("duration_s", Kind::F64),
        ColumnDef::optional("processing_s", Kind::F64),
    ];
    cols.extend(
        classes
            .iter()
            .map(|c| ColumnDef::optional(&format!("share_{c}"), Kind::F32)),
    );
    cols.push(ColumnDef::new("warnings", Kind::I64));
    cols.push(ColumnDef::optional("error", Kind::Utf8));
    cols.push(ColumnDef::optional("notes", Kind::Utf8));
    cols.push(ColumnDef::optional("task", Kind::Utf8));
    cols.push(ColumnDef::optional("host", Kind::Utf8));
    cols
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Utf8,
    F64,
    F32,
    I64,
    I32,
}

#[derive(Clone, Debug)]
pub struct ColumnDef {
    pub name: String,
    pub kind: Kind,
    pub optional: bool,
}

impl ColumnDef {
    fn new(name: &str, kind: Kind) -> Self {
        Self {
            name: name.into(),
            kind,
            optional: false,
        }
    }

    fn optional(name: &str, kind: Kind) -> Self {
        Self {
            optional: true,
            ..Self::new(name, kind)
        }
    }

    fn schema_line(&self) -> String {
        let rep = if self.optional {
            "OPTIONAL"
        } else {
            "REQUIRED"
        };
        let ty = match self.kind {
            Kind::Utf8 => "BYTE_ARRAY",
            Kind::F64 => "DOUBLE",
            Kind::F32 => "FLOAT",
            Kind::I64 => "INT64",
            Kind::I32 => "INT32",
        };
        let note = if self.kind == Kind::Utf8 {
            " (UTF8)"
        } else {
            ""
        };
        format!("  {rep} {ty} {}{note};\n", self.name)
    }
}

/// One value of a row.
#[derive(Clone, Debug)]
enum Cell {
    Str(String),
    F64(f64),
    F32(f32),
    I64(i64),
    I32(i32),
    Null,
}

enum Values {
    Utf8(Vec<ByteArray>),
    F64(Vec<f64>),
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
}

struct Column {
    def: ColumnDef,
    values: Values,
    /// Definition levels (optional columns): 1 set, 0 null.
    defs: Vec<i16>,
}

/// A Parquet file written row by row, a row group at a time.
struct Table {
    path: PathBuf,
    tmp: PathBuf,
    writer: SerializedFileWriter<File>,
    columns: Vec<Column>,
    buffered: usize,
}

impl Table {
    fn create(path: &Path, name: &str, defs: Vec<ColumnDef>) -> Result<Self, BatchError> {
        let mut schema = format!("message {name} {{\n");
        for d in &defs {
            schema.push_str(&d.schema_line());
        }
        schema.push('}');
        let schema = parse_message_type(&schema).map_err(|e| BatchError::write(path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("cliper {}", env!("CARGO_PKG_VERSION")))
            .build();
        let tmp = path.with_extension("parquet.tmp");
        let file = File::create(&tmp).map_err(|e| BatchError::write(&tmp, e))?;
        let writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props))
            .map_err(|e| BatchError::write(&tmp, e))?;
        let columns = defs
            .into_iter()
            .map(|def| Column {
                values: match def.kind {
                    Kind::Utf8 => Values::Utf8(Vec::new()),
                    Kind::F64 => Values::F64(Vec::new()),
                    Kind::F32 => Values::F32(Vec::new()),
                    Kind::I64 => Values::I64(Vec::new()),
                    Kind::I32 => Values::I32(Vec::new()),
                },
                def,
                defs: Vec::new(),
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            writer,
            columns,
            buffered: 0,
        })
    }

    fn row(&mut self, cells: Vec<Cell>) -> Result<(), BatchError> {
        debug_assert_eq!(cells.len(), self.columns.len());
        for (col, cell) in self.columns.iter_mut().zip(cells) {
            let set = !matches!(cell, Cell::Null);
            if col.def.optional {
                col.defs.push(i16::from(set));
            }
            match (&mut col.values, cell) {
                (_, Cell::Null) if col.def.optional => {}
                (Values::Utf8(v), Cell::Str(s)) => v.push(ByteArray::from(s.into_bytes())),
                (Values::F64(v), Cell::F64(x)) => v.push(x),
                (Values::F32(v), Cell::F32(x)) => v.push(x),
                (Values::I64(v), Cell::I64(x)) => v.push(x),
                (Values::I32(v), Cell::I32(x)) => v.push(x),
                (_, c) => {
                    return Err(BatchError::write(
                        &self.path,
                        format!("column {} got {c:?}", col.def.name),
                    ))
                }
            }
        }
        self.buffered += 1;
        if self.buffered >= ROW_GROUP {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BatchError> {
        if self.buffered == 0 {
            return Ok(());
        }
        let err = |e: parquet::errors::ParquetError| BatchError::write(&self.tmp, e);
        let mut group = self.writer.next_row_group().map_err(err)?;
        for col in &mut self.columns {
            let Some(mut w) = group.next_column().map_err(err)? else {
                return Err(BatchError::write(
                    &self.tmp,
                    "fewer columns than the schema",
                ));
            };
            let defs = col.def.optional.then_some(col.defs.as_slice());
            match &col.values {
                Values::Utf8(v) => w.typed::<ByteArrayType>().write_batch(v, defs, None),
                Values::F64(v) => w.typed::<DoubleType>().write_batch(v, defs, None),
                Values::F32(v) => w.typed::<FloatType>().write_batch(v, defs, None),
                Values::I64(v) => w.typed::<Int64Type>().write_batch(v, defs, None),
                Values::I32(v) => w.typed::<Int32Type>().write_batch(v, defs, None),
            }
            .map_err(err)?;
            w.close().map_err(err)?;
            match &mut col.values {
                Values::Utf8(v) => v.clear(),
                Values::F64(v) => v.clear(),
                Values::F32(v) => v.clear(),
                Values::I64(v) => v.clear(),
                Values::I32(v) => v.clear(),
            }
            col.defs.clear();
        }
        group.close().map_err(err)?;
        self.buffered = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<(), BatchError> {
        self.flush()?;
        let tmp = self.tmp.clone();
        let file = self
            .writer
            .into_inner()
            .map_err(|e| BatchError::write(&tmp, e))?;
        file.sync_all().map_err(|e| BatchError::write(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| BatchError::write(&self.path, e))
    }
}
