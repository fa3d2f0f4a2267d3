//! Deciding how to read a stream from the writer schema in its header.
//!
//! - The current schema (by Parsing Canonical Form) is read by the fast
//!   reader in [`crate::datum`].
//! - The seed-era schema is read by the fast seed reader and flattened.
//! - Anything else goes through Avro schema resolution (apache-avro) against
//!   the current schema, or failing that the seed-era one. A stream neither
//!   resolves to is refused with an error naming the field.

use std::sync::OnceLock;

use apache_avro::{Schema, schema_compatibility::SchemaCompatibility, types::Value};

use crate::datum::{self, Cursor, DatumError};
use crate::model::{Datapoint, MetricList, Tag};

/// The current schema, verbatim from the original project.
pub const METRICS_AVSC: &str = include_str!("../avro/metrics.avsc");
/// The seed-era schema (`metrics: [Metric{name, datapoints}]`).
pub const SEED_METRICS_AVSC: &str = include_str!("../avro/metrics-seed.avsc");

/// The schema string our encoder writes into `avro.schema`: the current schema
/// with every `doc` removed, keys sorted and no whitespace, exactly as the
/// mesos module writes it (`generate_metrics_schema_json.py`).
pub const HEADER_SCHEMA_JSON: &str = concat!(
    r#"{"fields":[{"name":"topic","type":"string"},{"name":"tags","type":{"items":{"fields":"#,
    r#"[{"name":"key","type":"string"},{"name":"value","type":"string"}],"name":"Tag","#,
    r#""namespace":"dcos.metrics","type":"record"},"type":"array"}},{"name":"datapoints","#,
    r#""type":{"items":{"fields":[{"name":"name","type":"string"},{"logicalType":"#,
    r#""timestamp-millis","name":"time_ms","type":"long"},{"name":"value","type":"double"}],"#,
    r#""name":"Datapoint","namespace":"dcos.metrics","type":"record"},"type":"array"}}],"#,
    r#""name":"MetricList","namespace":"dcos.metrics","type":"record"}"#
);

struct Known {
    schema: Schema,
    canonical: String,
}

fn known(cell: &'static OnceLock<Known>, json: &str) -> &'static Known {
    cell.get_or_init(|| {
        let schema = Schema::parse_str(json).expect("the bundled .avsc files parse");
        let canonical = schema.canonical_form();
        Known { schema, canonical }
    })
}

/// The current `dcos.metrics.MetricList` schema.
pub fn metrics_schema() -> &'static Schema {
    static CELL: OnceLock<Known> = OnceLock::new();
    &known(&CELL, METRICS_AVSC).schema
}

fn current() -> &'static Known {
    static CELL: OnceLock<Known> = OnceLock::new();
    known(&CELL, METRICS_AVSC)
}

fn seed() -> &'static Known {
    static CELL: OnceLock<Known> = OnceLock::new();
    known(&CELL, SEED_METRICS_AVSC)
}

/// The seed-era schema.
pub fn seed_schema() -> &'static Schema {
    &seed().schema
}

/// Which of the shapes a stream's records are read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaKind {
    /// The current schema: read directly.
    Current,
    /// The seed-era schema: read and flattened.
    Seed,
    /// Another writer schema, resolved to the current schema.
    ResolvedToCurrent,
    /// Another writer schema, resolved to the seed-era schema, then flattened.
    ResolvedToSeed,
}

/// Why a writer schema was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The header's `avro.schema` is not a valid Avro schema.
    #[error("writer schema does not parse: {0}")]
    Parse(String),
    /// The writer schema can't be resolved to either known schema.
    #[error(
        "writer schema can't be resolved to dcos.metrics.MetricList: field `{field}`: {reason}"
    )]
    Incompatible {
        /// The dotted path of the first offending field, or `(record)` when
        /// the problem is the record itself (its name or type).
        field: String,
        /// What apache-avro's compatibility check said.
        reason: String,
    },
}

/// How to turn a block's bytes into MetricLists.
#[derive(Debug, Clone)]
pub struct ReaderPlan {
    kind: SchemaKind,
    /// The writer schema, kept only when records go through resolution.
    writer: Option<Box<Schema>>,
}

/// Runs `work` on apache-avro, turning a panic into an error: it panics on
/// some schemas it parses (found by fuzzing: a `size` that is a string of
/// letters), and a schema comes from the sender of a stream.
fn guarded<T, E>(
    work: impl FnOnce() -> Result<T, E>,
    failed: impl FnOnce(String) -> E,
) -> Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|m| (*m).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(failed(format!("apache-avro failed: {message}")))
    })
}

/// Refuses integer attributes (`size`, `precision`, `scale`) that are not
/// integers: apache-avro accepts them when it parses a schema, then panics
/// when it writes the schema's canonical form.
fn check_integer_attributes(value: &serde_json::Value) -> Result<(), SchemaError> {
    match value {
        serde_json::Value::Object(members) => {
            for (key, member) in members {
                if matches!(key.as_str(), "size" | "precision" | "scale") {
                    let integer = member.as_i64().is_some()
                        || member.as_str().is_some_and(|s| s.parse::<i64>().is_ok());
                    if !integer {
                        return Err(SchemaError::Parse(format!(
                            "`{key}` must be an integer, not {member}"
                        )));
                    }
                }
                check_integer_attributes(member)?;
            }
            Ok(())
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(check_integer_attributes),
        _ => Ok(()),
    }
}

impl ReaderPlan {
    /// Chooses how to read data written with `writer_json`.
    pub fn for_writer_schema(writer_json: &str) -> Result<Self, SchemaError> {
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(writer_json) {
            check_integer_attributes(&json)?;
        }
        guarded(|| Self::plan(writer_json), SchemaError::Parse)
    }

    fn plan(writer_json: &str) -> Result<Self, SchemaError> {
        let writer =
            Schema::parse_str(writer_json).map_err(|e| SchemaError::Parse(e.to_string()))?;
        let canonical = writer.canonical_form();
        if canonical == current().canonical {
            return Ok(Self {
                kind: SchemaKind::Current,
                writer: None,
            });
        }
        if canonical == seed().canonical {
            return Ok(Self {
                kind: SchemaKind::Seed,
                writer: None,
            });
        }
        match SchemaCompatibility::can_read(&writer, &current().schema) {
            Ok(_) => Ok(Self {
                kind: SchemaKind::ResolvedToCurrent,
                writer: Some(Box::new(writer)),
            }),
            Err(current_error) => match SchemaCompatibility::can_read(&writer, &seed().schema) {
                Ok(_) => Ok(Self {
                    kind: SchemaKind::ResolvedToSeed,
                    writer: Some(Box::new(writer)),
                }),
                Err(_) => {
                    let (field, reason) = describe(&current_error);
                    Err(SchemaError::Incompatible { field, reason })
                }
            },
        }
    }

    /// The current schema, as our own encoder writes it.
    pub fn current() -> Self {
        Self {
            kind: SchemaKind::Current,
            writer: None,
        }
    }

    /// Which shape the records are read as.
    pub fn kind(&self) -> SchemaKind {
        self.kind
    }

    /// Reads `count` records from `data`, appending them to `out`.
    pub fn read_records(
        &self,
        data: &[u8],
        count: u64,
        out: &mut Vec<MetricList>,
    ) -> Result<usize, RecordError> {
        let mut cursor = Cursor::new(data);
        let read: fn(&mut Cursor<'_>) -> Result<MetricList, DatumError> = match self.kind {
            SchemaKind::Current => datum::read_metric_list,
            SchemaKind::Seed => datum::read_seed_metric_list,
            SchemaKind::ResolvedToCurrent | SchemaKind::ResolvedToSeed => {
                return guarded(
                    || self.read_resolved(data, count, out),
                    |reason| RecordError { index: 0, reason },
                );
            }
        };
        for index in 0..count {
            let record = read(&mut cursor).map_err(|e| RecordError {
                index,
                reason: e.to_string(),
            })?;
            out.push(record);
        }
        Ok(cursor.position())
    }

    fn read_resolved(
        &self,
        data: &[u8],
        count: u64,
        out: &mut Vec<MetricList>,
    ) -> Result<usize, RecordError> {
        let writer = self
            .writer
            .as_deref()
            .expect("resolved plans keep their writer schema");
        let to_seed = self.kind == SchemaKind::ResolvedToSeed;
        let reader_schema = if to_seed {
            &seed().schema
        } else {
            &current().schema
        };
        let fail = |index, reason: String| RecordError { index, reason };
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(writer)
            .reader_schema(reader_schema)
            .build()
            .map_err(|e| fail(0, e.to_string()))?;
        let mut rest = data;
        for index in 0..count {
            let value = reader
                .read_value(&mut rest)
                .map_err(|e| fail(index, e.to_string()))?;
            let record = if to_seed {
                seed_from_value(value)
            } else {
                current_from_value(value)
            };
            out.push(record.map_err(|reason| fail(index, reason.to_owned()))?);
        }
        Ok(data.len() - rest.len())
    }
}

/// A record in a block that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {index} of the block: {reason}")]
pub struct RecordError {
    /// Index of the record within its block.
    pub index: u64,
    /// What went wrong.
    pub reason: String,
}

/// Walks apache-avro's compatibility error to the innermost field it names.
fn describe(error: &apache_avro::error::CompatibilityError) -> (String, String) {
    use apache_avro::error::CompatibilityError as E;
    let mut path = Vec::new();
    let mut at = error;
    loop {
        match at {
            E::FieldTypeMismatch(field, inner) => {
                path.push(field.clone());
                at = inner;
            }
            E::MissingDefaultValue(field) => {
                path.push(field.clone());
                break;
            }
            _ => break,
        }
    }
    let field = if path.is_empty() {
        "(record)".to_owned()
    } else {
        path.join(".")
    };
    (field, at.to_string())
}

fn fields(value: Value) -> Result<Vec<(String, Value)>, &'static str> {
    match value {
        Value::Record(fields) => Ok(fields),
        _ => Err("resolved value is not a record"),
    }
}

fn take(fields: &mut [(String, Value)], name: &str) -> Result<Value, &'static str> {
    fields
        .iter_mut()
        .find(|(n, _)| n == name)
        .map(|(_, v)| std::mem::replace(v, Value::Null))
        .ok_or("resolved record lacks a field")
}

fn string(value: Value) -> Result<String, &'static str> {
    match value {
        Value::String(s) => Ok(s),
        _ => Err("expected a string"),
    }
}

fn long(value: Value) -> Result<i64, &'static str> {
    match value {
        Value::Long(n) | Value::TimestampMillis(n) => Ok(n),
        Value::Int(n) => Ok(n.into()),
        _ => Err("expected a long"),
    }
}

fn double(value: Value) -> Result<f64, &'static str> {
    match value {
        Value::Double(n) => Ok(n),
        Value::Float(n) => Ok(n.into()),
        _ => Err("expected a double"),
    }
}

fn array(value: Value) -> Result<Vec<Value>, &'static str> {
    match value {
        Value::Array(items) => Ok(items),
        _ => Err("expected an array"),
    }
}

fn tags_from(value: Value) -> Result<Vec<Tag>, &'static str> {
    array(value)?
        .into_iter()
        .map(|tag| {
            let mut f = fields(tag)?;
            Ok(Tag {
                key: string(take(&mut f, "key")?)?,
                value: string(take(&mut f, "value")?)?,
            })
        })
        .collect()
}

fn current_from_value(value: Value) -> Result<MetricList, &'static str> {
    let mut f = fields(value)?;
    let datapoints = array(take(&mut f, "datapoints")?)?
        .into_iter()
        .map(|point| {
            let mut p = fields(point)?;
            Ok(Datapoint {
                name: string(take(&mut p, "name")?)?,
                time_ms: long(take(&mut p, "time_ms")?)?,
                value: double(take(&mut p, "value")?)?,
            })
        })
        .collect::<Result<_, &'static str>>()?;
    Ok(MetricList {
        topic: string(take(&mut f, "topic")?)?,
        tags: tags_from(take(&mut f, "tags")?)?,
        datapoints,
    })
}

fn seed_from_value(value: Value) -> Result<MetricList, &'static str> {
    let mut f = fields(value)?;
    let mut datapoints = Vec::new();
    for metric in array(take(&mut f, "metrics")?)? {
        let mut m = fields(metric)?;
        let name = string(take(&mut m, "name")?)?;
        for point in array(take(&mut m, "datapoints")?)? {
            let mut p = fields(point)?;
            datapoints.push(Datapoint {
                name: name.clone(),
                time_ms: long(take(&mut p, "time")?)?,
                value: double(take(&mut p, "value")?)?,
            });
        }
    }
    Ok(MetricList {
        topic: string(take(&mut f, "topic")?)?,
        tags: tags_from(take(&mut f, "tags")?)?,
        datapoints,
    })
}

#[cfg(test)]
mod tests {

    /// Found by fuzzing (writer_schema): apache-avro panicked making the
    /// canonical form of a record schema with a `precision` attribute that
    /// is not a number. Such schemas are refused before apache-avro sees
    /// them; a panic it might still have in store is turned into an error.
    #[test]
    fn a_schema_apache_avro_panics_on_is_refused() {
        for precision in [r#""x""#, "1.5", "true", "{}"] {
            let writer = format!(
                r#"{{"type": "record", "name": "r", "precision": {precision}, "fields": []}}"#
            );
            let error = ReaderPlan::for_writer_schema(&writer).unwrap_err();
            assert!(
                matches!(&error, SchemaError::Parse(reason) if reason.contains("precision")),
                "{error}"
            );
        }
        let guarded_error = guarded(
            || -> Result<(), SchemaError> { panics() },
            SchemaError::Parse,
        )
        .unwrap_err();
        assert!(
            matches!(&guarded_error, SchemaError::Parse(reason) if reason.starts_with("apache-avro failed")),
            "{guarded_error}"
        );
    }

    fn panics() -> Result<(), SchemaError> {
        panic!("as apache-avro does on a schema it should have refused")
    }

    use super::*;

    #[test]
    fn header_schema_has_the_current_canonical_form_and_the_module_bytes() {
        let plan = ReaderPlan::for_writer_schema(HEADER_SCHEMA_JSON).unwrap();
        assert_eq!(plan.kind(), SchemaKind::Current);
        assert_eq!(
            HEADER_SCHEMA_JSON.len(),
            549,
            "the module's schema string is 549 bytes"
        );
    }

    #[test]
    fn verbatim_schemas_are_recognised() {
        assert_eq!(
            ReaderPlan::for_writer_schema(METRICS_AVSC).unwrap().kind(),
            SchemaKind::Current
        );
        assert_eq!(
            ReaderPlan::for_writer_schema(SEED_METRICS_AVSC)
                .unwrap()
                .kind(),
            SchemaKind::Seed
        );
    }

    #[test]
    fn an_extra_writer_field_resolves() {
        let json = METRICS_AVSC.replacen(
            r#""fields": [ {"#,
            r#""fields": [ {"name": "host", "type": "string"}, {"#,
            1,
        );
        assert_eq!(
            ReaderPlan::for_writer_schema(&json).unwrap().kind(),
            SchemaKind::ResolvedToCurrent
        );
    }

    #[test]
    fn an_unresolvable_schema_names_the_field() {
        let json = METRICS_AVSC.replace(r#""type": "double""#, r#""type": "string""#);
        let err = ReaderPlan::for_writer_schema(&json).unwrap_err();
        let SchemaError::Incompatible { field, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(field, "datapoints.value", "{err}");
    }

    #[test]
    fn garbage_schema_is_a_parse_error() {
        assert!(matches!(
            ReaderPlan::for_writer_schema("{not json"),
            Err(SchemaError::Parse(_))
        ));
    }
}
