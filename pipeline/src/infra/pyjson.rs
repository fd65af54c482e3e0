//! Python-style JSON and float text: documents written byte for byte as Python's `json` module
//! writes them (sd-scripts' metadata and our own documents), Python's `repr(float)`, and the one
//! reader of the JSON documents the stages exchange (metadata, manifests, indexes, states).

use std::fmt;
use std::io::Write;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::infra::fsio;
use crate::{Error, Result};

/// Writes `value` as Python's `json.dump(value, indent=indent, ensure_ascii=ensure_ascii)` does.
pub fn write_python_json<W: Write, T: serde::Serialize + ?Sized>(
    writer: W,
    value: &T,
    indent: usize,
    ensure_ascii: bool,
) -> std::io::Result<()> {
    let indent = vec![b' '; indent];
    let formatter = PythonFormatter {
        pretty: Some(serde_json::ser::PrettyFormatter::with_indent(&indent)),
        ensure_ascii,
    };
    let mut serializer = serde_json::Serializer::with_formatter(writer, formatter);
    value
        .serialize(&mut serializer)
        .map_err(std::io::Error::other)
}

/// `value` as Python's `json.dumps(value)` writes it: one line, `", "` and `": "` separators,
/// non-ASCII escaped (the JSON text sd-scripts stores in `ss_*` metadata).
pub fn dumps<T: serde::Serialize + ?Sized>(value: &T) -> String {
    let formatter = PythonFormatter {
        pretty: None,
        ensure_ascii: true,
    };
    let mut bytes = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, formatter);
    value.serialize(&mut serializer).expect("writing to memory");
    String::from_utf8(bytes).expect("ASCII output")
}

/// serde_json formatter matching Python's `json` module output: indented with `pretty`, else
/// `json.dumps`' default one-line separators.
struct PythonFormatter<'a> {
    pretty: Option<serde_json::ser::PrettyFormatter<'a>>,
    ensure_ascii: bool,
}

macro_rules! delegate {
    ($($name:ident($($arg:ident : $ty:ty),*);)*) => {$(
        fn $name<W: ?Sized + Write>(&mut self, w: &mut W $(, $arg: $ty)*) -> std::io::Result<()> {
            match &mut self.pretty {
                Some(pretty) => serde_json::ser::Formatter::$name(pretty, w $(, $arg)*),
                None => serde_json::ser::Formatter::$name(
                    &mut serde_json::ser::CompactFormatter, w $(, $arg)*),
            }
        }
    )*};
}

impl serde_json::ser::Formatter for PythonFormatter<'_> {
    delegate! {
        begin_array();
        end_array();
        end_array_value();
        begin_object();
        end_object();
        end_object_value();
    }

    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        match &mut self.pretty {
            Some(pretty) => serde_json::ser::Formatter::begin_array_value(pretty, w, first),
            None if first => Ok(()),
            None => w.write_all(b", "),
        }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        match &mut self.pretty {
            Some(pretty) => serde_json::ser::Formatter::begin_object_key(pretty, w, first),
            None if first => Ok(()),
            None => w.write_all(b", "),
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        match &mut self.pretty {
            Some(pretty) => serde_json::ser::Formatter::begin_object_value(pretty, w),
            None => w.write_all(b": "),
        }
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if !self.ensure_ascii || fragment.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for ch in fragment.chars() {
            if (' '..'\u{7f}').contains(&ch) {
                w.write_all(&[ch as u8])?;
            } else {
                for unit in ch.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }

    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, value: f64) -> std::io::Result<()> {
        let text = match value {
            v if v.is_nan() => "NaN".to_string(),
            v if v.is_infinite() && v > 0.0 => "Infinity".to_string(),
            v if v.is_infinite() => "-Infinity".to_string(),
            v => float_repr(v),
        };
        w.write_all(text.as_bytes())
    }

    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, value: f32) -> std::io::Result<()> {
        self.write_f64(w, value as f64)
    }
}

/// `value` as the stages write their own JSON documents: indent 2, UTF-8 kept, final newline.
pub fn document_bytes<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_python_json(&mut bytes, value, 2, false).expect("writing to memory");
    bytes.push(b'\n');
    bytes
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from 1e16,
/// `nan`, `inf` and `-inf` for the non-finite values.
pub fn float_repr(value: f64) -> String {
    if value.is_nan() {
        return "nan".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.into();
    }
    let abs = value.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let formatted = format!("{value:e}");
        let (mantissa, exponent) = formatted.split_once('e').expect("exponent form");
        let exponent: i32 = exponent.parse().expect("integer exponent");
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let plain = format!("{value}");
    if plain.contains('.') {
        plain
    } else {
        format!("{plain}.0")
    }
}

/// Reads the JSON document at `path` with [`parse_document`]; errors name the file.
pub fn read_document(path: &Path) -> Result<Value> {
    parse_document(&fsio::read(path)?).map_err(|message| Error::bad_file(path, message))
}

/// Parses a JSON document strictly: UTF-8 (a leading byte-order mark is skipped), no object
/// with the same key twice (serde_json and Python would keep the last one silently, dropping
/// data). The error says what is wrong: UTF-16 text, a duplicate key and where, a file cut
/// short, or the JSON syntax error with its line and column.
pub fn parse_document(bytes: &[u8]) -> std::result::Result<Value, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if let Some(encoding) = utf16_or_32(bytes) {
        return Err(format!(
            "the file is {encoding}, not UTF-8; save it as UTF-8 (e.g. in a text editor, or \
             with iconv -f {encoding} -t UTF-8)"
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = UniqueKeys { at: &Pointer::Root }
        .deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value));
    value.map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => format!(
            "not valid JSON ({e}): the file ends too early; was it cut short? regenerate it \
             with the stage that wrote it"
        ),
        serde_json::error::Category::Io => format!("cannot be read ({e})"),
        _ => format!("not valid JSON ({e})"),
    })
}

/// The name of the 16- or 32-bit Unicode encoding `bytes` are in, recognised by a byte-order
/// mark or by the zero bytes around the first (ASCII) character of a JSON text.
fn utf16_or_32(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0xFF, 0xFE, 0, 0, ..] | [_, 0, 0, 0, ..] => Some("UTF-32LE"),
        [0, 0, 0xFE, 0xFF, ..] | [0, 0, 0, _, ..] => Some("UTF-32BE"),
        [0xFF, 0xFE, ..] | [_, 0, ..] => Some("UTF-16LE"),
        [0xFE, 0xFF, ..] | [0, _, ..] => Some("UTF-16BE"),
        _ => None,
    }
}

/// Where a value sits in the document (a JSON Pointer built only when an error names it).
enum Pointer<'a> {
    Root,
    Key(&'a Pointer<'a>, &'a str),
    Index(&'a Pointer<'a>, usize),
}

impl fmt::Display for Pointer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pointer::Root => Ok(()),
            Pointer::Key(parent, key) => {
                write!(f, "{parent}/{}", key.replace('~', "~0").replace('/', "~1"))
            }
            Pointer::Index(parent, index) => write!(f, "{parent}/{index}"),
        }
    }
}

/// Deserialises a [`Value`] like serde_json does, refusing an object key that appears twice.
struct UniqueKeys<'a> {
    at: &'a Pointer<'a>,
}

impl<'de> DeserializeSeed<'de> for UniqueKeys<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(UniqueKeys {
            at: &Pointer::Index(self.at, items.len()),
        })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let place = match self.at.to_string() {
                    top if top.is_empty() => "the top-level object".to_string(),
                    nested => format!("the object at {nested}"),
                };
                return Err(serde::de::Error::custom(format!(
                    "key {key:?} appears twice in {place}; JSON readers would keep only the last \
                     one, so remove or rename one of them"
                )));
            }
            let value = map.next_value_seed(UniqueKeys {
                at: &Pointer::Key(self.at, &key),
            })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_read_strictly() {
        let parsed = parse_document(b"{\"a\": {\"x\": [1, 2.5, null, true, \"s\"]}, \"b\": {}}");
        assert_eq!(
            parsed.unwrap(),
            serde_json::json!({"a": {"x": [1, 2.5, null, true, "s"]}, "b": {}})
        );
        let bom = parse_document(b"\xEF\xBB\xBF{\"a\": 1}").unwrap();
        assert_eq!(bom, serde_json::json!({"a": 1}));

        let nested = parse_document(b"{\"img.png\": {\"caption\": \"a\",\n \"caption\": \"b\"}}");
        let message = nested.unwrap_err();
        assert!(
            message.contains("\"caption\" appears twice in the object at /img.png")
                && message.contains("line 2"),
            "{message}"
        );
        let top = parse_document(b"{\"k\": {}, \"k\": {}}").unwrap_err();
        assert!(
            top.contains("\"k\" appears twice in the top-level object"),
            "{top}"
        );

        let utf16: Vec<u8> = "\u{feff}{\"a\": 1}"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let message = parse_document(&utf16).unwrap_err();
        assert!(
            message.contains("UTF-16LE") && message.contains("save it as UTF-8"),
            "{message}"
        );
        let without_bom: Vec<u8> = "{}".encode_utf16().flat_map(u16::to_be_bytes).collect();
        assert!(parse_document(&without_bom)
            .unwrap_err()
            .contains("UTF-16BE"));

        assert!(parse_document(b"{\"a\": [1,")
            .unwrap_err()
            .contains("cut short"));
        let syntax = parse_document(b"{\"a\": 1,, }").unwrap_err();
        assert!(!syntax.contains("cut short"), "{syntax}");
        assert!(parse_document(b"{} x").is_err());
    }

    #[test]
    fn floats_read_as_python_writes_them() {
        for (value, text) in [
            (1.0, "1.0"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e16, "1e+16"),
            (1.5e20, "1.5e+20"),
            (123.25, "123.25"),
            (123456789.0, "123456789.0"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(float_repr(value), text);
        }
        let json = document_bytes(&serde_json::json!({"lr": 1e-5, "x": f64::NAN, "name": "é"}));
        assert_eq!(
            String::from_utf8(json).unwrap(),
            "{\n  \"lr\": 1e-05,\n  \"x\": null,\n  \"name\": \"é\"\n}\n"
        );
    }
}
