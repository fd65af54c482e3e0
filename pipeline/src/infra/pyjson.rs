//! Python-style JSON and float text: documents written byte for byte as Python's `json` module
//! writes them (sd-scripts' metadata and our own documents), and Python's `repr(float)`.

use std::io::Write;

/// Writes `value` as Python's `json.dump(value, indent=indent, ensure_ascii=ensure_ascii)` does.
pub fn write_python_json<W: Write, T: serde::Serialize + ?Sized>(
    writer: W,
    value: &T,
    indent: usize,
    ensure_ascii: bool,
) -> std::io::Result<()> {
    let indent = vec![b' '; indent];
    let formatter = PythonFormatter {
        pretty: serde_json::ser::PrettyFormatter::with_indent(&indent),
        ensure_ascii,
    };
    let mut serializer = serde_json::Serializer::with_formatter(writer, formatter);
    value
        .serialize(&mut serializer)
        .map_err(std::io::Error::other)
}

/// serde_json formatter matching Python's `json` module output.
struct PythonFormatter<'a> {
    pretty: serde_json::ser::PrettyFormatter<'a>,
    ensure_ascii: bool,
}

macro_rules! delegate {
    ($($name:ident($($arg:ident : $ty:ty),*);)*) => {$(
        fn $name<W: ?Sized + Write>(&mut self, w: &mut W $(, $arg: $ty)*) -> std::io::Result<()> {
            serde_json::ser::Formatter::$name(&mut self.pretty, w $(, $arg)*)
        }
    )*};
}

impl serde_json::ser::Formatter for PythonFormatter<'_> {
    delegate! {
        begin_array();
        end_array();
        begin_array_value(first: bool);
        end_array_value();
        begin_object();
        end_object();
        begin_object_key(first: bool);
        begin_object_value();
        end_object_value();
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

#[cfg(test)]
mod tests {
    use super::*;

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
