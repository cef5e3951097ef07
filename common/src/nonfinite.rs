//! How cvdist writes floating-point values that are not finite (a diverged loss is NaN or
//! infinite) into the JSON files of a run directory, and reads them back.
//!
//! JSON has no NaN or infinity. `serde_json` writes them as `null` and then refuses to read
//! `null` back as a number, so with their defaults a diverged run would leave a `metrics.jsonl`
//! that `cvdist report` could not open. The rule, for every `f64` in those files:
//!
//! * **written**: a finite value as a JSON number; NaN, +inf and -inf as `null` (standard
//!   JSON, what `JSON.stringify` writes; jq, pandas and Python's `json` read it as a missing
//!   value, and a non-finite loss carries no more information than "diverged");
//! * **read**: a number as itself, `null` as NaN, and — for files written by other tools —
//!   the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, `"inf"`, `"-inf"` (any case) as the
//!   values they name.
//!
//! Use with `#[serde(with = "cvdist_common::nonfinite")]` on an `f64` field, or
//! `nonfinite::array` on a `[f64; N]` field.

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use std::fmt;

/// Writes `v` as a JSON number when finite, else as `null`.
pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// Reads a number, `null` (as NaN), or a string naming a non-finite value.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    d.deserialize_any(F64Visitor)
}

/// The value a string names, for the spellings listed in the module documentation.
pub fn parse_special(text: &str) -> Option<f64> {
    match text.trim().to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

struct F64Visitor;

impl<'de> Visitor<'de> for F64Visitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, null (not a number), or \"NaN\"/\"Infinity\"/\"-Infinity\"")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_unit<E: de::Error>(self) -> Result<f64, E> {
        Ok(f64::NAN)
    }

    fn visit_none<E: de::Error>(self) -> Result<f64, E> {
        Ok(f64::NAN)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<f64, D::Error> {
        d.deserialize_any(F64Visitor)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        parse_special(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
    }
}

/// The same rule for a fixed-size array of `f64` (e.g. a checkpoint's partial-epoch sums).
pub mod array {
    use serde::de::{Deserializer, Error as _};
    use serde::ser::{SerializeTuple, Serializer};
    use serde::Deserialize;

    #[derive(serde::Serialize, Deserialize)]
    struct Item(#[serde(with = "super")] f64);

    pub fn serialize<S: Serializer, const N: usize>(v: &[f64; N], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(N)?;
        for x in v {
            t.serialize_element(&Item(*x))?;
        }
        t.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[f64; N], D::Error> {
        let items: Vec<Item> = Vec::deserialize(d)?;
        let got = items.len();
        let values: Vec<f64> = items.into_iter().map(|i| i.0).collect();
        values.try_into().map_err(|_| D::Error::invalid_length(got, &format!("{N} numbers").as_str()))
    }
}

/// The same rule for a list of fixed-size arrays (e.g. a checkpoint's per-rank partial sums).
pub mod vec_of_arrays {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Row<const N: usize>(#[serde(with = "super::array")] [f64; N]);

    pub fn serialize<S: Serializer, const N: usize>(v: &[[f64; N]], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|r| Row(*r)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<Vec<[f64; N]>, D::Error> {
        Ok(Vec::<Row<N>>::deserialize(d)?.into_iter().map(|r| r.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    struct One(#[serde(with = "super")] f64);

    #[derive(Debug, Serialize, Deserialize)]
    struct Four(#[serde(with = "super::array")] [f64; 4]);

    #[test]
    fn non_finite_values_are_written_as_null_and_read_as_nan() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let text = serde_json::to_string(&One(v)).unwrap();
            assert_eq!(text, "null");
            assert!(serde_json::from_str::<One>(&text).unwrap().0.is_nan());
        }
        let text = serde_json::to_string(&One(0.25)).unwrap();
        assert_eq!(serde_json::from_str::<One>(&text).unwrap().0, 0.25);
        assert_eq!(serde_json::from_str::<One>("3").unwrap().0, 3.0);
    }

    #[test]
    fn strings_naming_non_finite_values_are_read() {
        assert!(serde_json::from_str::<One>("\"NaN\"").unwrap().0.is_nan());
        assert_eq!(serde_json::from_str::<One>("\"Infinity\"").unwrap().0, f64::INFINITY);
        assert_eq!(serde_json::from_str::<One>("\"-inf\"").unwrap().0, f64::NEG_INFINITY);
        let err = serde_json::from_str::<One>("\"fast\"").unwrap_err().to_string();
        assert!(err.contains("NaN"), "{err}");
    }

    #[test]
    fn arrays_follow_the_same_rule() {
        let text = serde_json::to_string(&Four([1.0, f64::NAN, 3.0, f64::INFINITY])).unwrap();
        assert_eq!(text, "[1.0,null,3.0,null]");
        let back: Four = serde_json::from_str(&text).unwrap();
        assert_eq!(back.0[0], 1.0);
        assert!(back.0[1].is_nan() && back.0[3].is_nan());
        assert!(serde_json::from_str::<Four>("[1,2,3]").is_err());
    }
}
