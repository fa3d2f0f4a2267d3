//! The three records of the `dcos.metrics` contract, as plain Rust types.
//!
//! Field order matches `avro/metrics.avsc`, which is also the order the JSON
//! form uses. Non-finite doubles have no JSON number form, so the JSON form
//! writes them as the strings `"NaN"`, `"Infinity"` and `"-Infinity"` (the
//! spelling Python's `json` and Jackson use) and reads them back.

use serde::{Deserialize, Serialize};

/// One or more named datapoints grouped under a topic, with metadata tags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricList {
    /// The topic or "channel" the datapoints are grouped into for subscription.
    pub topic: String,
    /// Labels that further identify the source, e.g. `framework_id`.
    pub tags: Vec<Tag>,
    /// The values themselves.
    pub datapoints: Vec<Datapoint>,
}

/// A metadatum attached to a [`MetricList`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tag {
    /// Tag name, e.g. `framework_id`.
    pub key: String,
    /// Tag value.
    pub value: String,
}

/// A named floating point value at a point in time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Datapoint {
    /// User-visible label, unique per topic.
    pub name: String,
    /// Milliseconds since the epoch (the schema's `timestamp-millis` hint).
    pub time_ms: i64,
    /// The value. May be NaN or infinite: Avro carries any IEEE 754 double.
    #[serde(with = "json_f64")]
    pub value: f64,
}

impl MetricList {
    /// Returns the value of the first tag named `key`.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }

    /// Adds `key=value` unless a tag with that key is already present.
    /// Returns whether the tag was added.
    pub fn add_tag_if_absent(&mut self, key: &str, value: &str) -> bool {
        if self.tags.iter().any(|t| t.key == key) {
            return false;
        }
        self.tags.push(Tag {
            key: key.to_owned(),
            value: value.to_owned(),
        });
        true
    }
}

impl Tag {
    /// Builds a tag from anything string-like.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

impl Datapoint {
    /// Builds a datapoint.
    pub fn new(name: impl Into<String>, time_ms: i64, value: f64) -> Self {
        Self {
            name: name.into(),
            time_ms,
            value,
        }
    }
}

/// JSON form of an `f64` that keeps NaN and the infinities.
pub mod json_f64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes finite values as numbers and the others as strings.
    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            serializer.serialize_f64(*value)
        } else if value.is_nan() {
            serializer.serialize_str("NaN")
        } else if *value > 0.0 {
            serializer.serialize_str("Infinity")
        } else {
            serializer.serialize_str("-Infinity")
        }
    }

    /// Reads a number, or one of the strings `serialize` writes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f64),
            Text(String),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Number(n) => Ok(n),
            Repr::Text(text) => match text.as_str() {
                "NaN" => Ok(f64::NAN),
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                other => Err(D::Error::custom(format!("not a double: {other:?}"))),
            },
        }
    }
}
