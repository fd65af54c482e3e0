//! Prompt lines as `gen_img.py` and sd-scripts' sample prompts read them: the prompt, then
//! options after ` --`: `--n` negative prompt, `--w` / `--h` size, `--d` seed(s), `--l` CFG
//! scale, `--s` steps, `--ss` sampler, `--g` guidance scale (a synonym of `--l` here), `--nl`
//! negative scale, `--ow` / `--oh` SDXL original size, `--ct` / `--cl` SDXL crop, `--am` network
//! multipliers, `--f` file name. Other options are ignored with a warning.

use std::path::Path;

use crate::{Error, Result};

/// One prompt line, parsed. `None` fields take the run's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptLine {
    /// The prompt text (before the first ` --`).
    pub prompt: String,
    /// `--n`.
    pub negative_prompt: Option<String>,
    /// `--w`.
    pub width: Option<usize>,
    /// `--h`.
    pub height: Option<usize>,
    /// `--d`: one seed per image (comma-separated).
    pub seeds: Vec<u64>,
    /// `--l` / `--g`.
    pub scale: Option<f64>,
    /// `--nl`.
    pub negative_scale: Option<f64>,
    /// `--s` (1 to 1000).
    pub steps: Option<usize>,
    /// `--ss`.
    pub sampler: Option<String>,
    /// `--ow`.
    pub original_width: Option<usize>,
    /// `--oh`.
    pub original_height: Option<usize>,
    /// `--ct`.
    pub crop_top: Option<usize>,
    /// `--cl`.
    pub crop_left: Option<usize>,
    /// `--am`: one multiplier per network.
    pub network_muls: Vec<f64>,
    /// `--f`: output file name.
    pub filename: Option<String>,
    /// Options that were not understood (warned about).
    pub ignored: Vec<String>,
}

/// Splits `--<name> <value>` into its name and value (the value may be empty).
fn option_parts(option: &str) -> (&str, &str) {
    match option.split_once(' ') {
        Some((name, value)) => (name, value.trim()),
        None => (option, ""),
    }
}

/// Parses one prompt line (sd-scripts' `line_to_prompt_dict` / gen_img's option loop).
pub fn parse_prompt_line(line: &str) -> PromptLine {
    let mut parts = line.trim().split(" --");
    let mut parsed = PromptLine {
        prompt: parts.next().unwrap_or_default().trim().to_string(),
        ..PromptLine::default()
    };
    for option in parts {
        let (name, value) = option_parts(option);
        let lower = name.to_ascii_lowercase();
        let int = || value.parse::<usize>().ok();
        let float = || value.parse::<f64>().ok().filter(|v| v.is_finite());
        let understood = match lower.as_str() {
            "n" if !value.is_empty() => {
                parsed.negative_prompt = Some(value.to_string());
                true
            }
            "w" => int().map(|v| parsed.width = Some(v)).is_some(),
            "h" => int().map(|v| parsed.height = Some(v)).is_some(),
            "d" => {
                let seeds: Option<Vec<u64>> =
                    value.split(',').map(|s| s.trim().parse().ok()).collect();
                seeds.map(|s| parsed.seeds = s).is_some()
            }
            "l" | "g" => float().map(|v| parsed.scale = Some(v)).is_some(),
            "nl" => {
                if value.eq_ignore_ascii_case("none") {
                    parsed.negative_scale = None;
                    true
                } else {
                    float().map(|v| parsed.negative_scale = Some(v)).is_some()
                }
            }
            "s" => int()
                .map(|v| parsed.steps = Some(v.clamp(1, 1000)))
                .is_some(),
            "ss" if !value.is_empty() => {
                parsed.sampler = Some(value.to_string());
                true
            }
            "ow" => int().map(|v| parsed.original_width = Some(v)).is_some(),
            "oh" => int().map(|v| parsed.original_height = Some(v)).is_some(),
            "ct" => int().map(|v| parsed.crop_top = Some(v)).is_some(),
            "cl" => int().map(|v| parsed.crop_left = Some(v)).is_some(),
            "am" => {
                let muls: Option<Vec<f64>> =
                    value.split(',').map(|s| s.trim().parse().ok()).collect();
                muls.map(|m| parsed.network_muls = m).is_some()
            }
            "f" if !value.is_empty() => {
                parsed.filename = Some(value.to_string());
                true
            }
            _ => false,
        };
        if !understood {
            parsed.ignored.push(format!("--{option}"));
        }
    }
    parsed
}

/// The prompt lines of a `--from_file` / `--sample_prompts` file: `.txt` (one prompt per line;
/// empty lines and lines starting with `#` skipped), `.toml` (`[[prompt.subset]]` tables with
/// `prompt`, `negative_prompt`, `width`, `height`, `seed`, `scale`, `sample_steps`,
/// `sample_sampler`; `[prompt]` keys are their defaults) or `.json` (a list of such objects).
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptLine>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match extension.as_str() {
        "toml" => {
            let value: toml::Value = toml::from_str(&text)
                .map_err(|e| Error::bad_file(path, format!("not a TOML prompt file: {e}")))?;
            let json =
                serde_json::to_value(value).map_err(|e| Error::bad_file(path, e.to_string()))?;
            let section = json.get("prompt").cloned().unwrap_or_default();
            let defaults = section.as_object().cloned().unwrap_or_default();
            let subsets = section
                .get("subset")
                .and_then(|s| s.as_array())
                .cloned()
                .unwrap_or_default();
            subsets
                .iter()
                .map(|subset| {
                    let mut merged = defaults.clone();
                    merged.remove("subset");
                    if let Some(fields) = subset.as_object() {
                        merged.extend(fields.clone());
                    }
                    prompt_from_object(path, &serde_json::Value::Object(merged))
                })
                .collect()
        }
        "json" => {
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(path, format!("not a JSON prompt file: {e}")))?;
            let items = json.as_array().ok_or_else(|| {
                Error::bad_file(path, "a JSON prompt file holds a list of prompt objects")
            })?;
            items
                .iter()
                .map(|item| prompt_from_object(path, item))
                .collect()
        }
        _ => Ok(text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(parse_prompt_line)
            .collect()),
    }
}

/// A prompt given as an object (TOML subset or JSON item), with sd-scripts' key names.
fn prompt_from_object(path: &Path, value: &serde_json::Value) -> Result<PromptLine> {
    let object = value
        .as_object()
        .ok_or_else(|| Error::bad_file(path, "each prompt must be a table / object"))?;
    let prompt = object
        .get("prompt")
        .and_then(|p| p.as_str())
        .ok_or_else(|| Error::bad_file(path, "a prompt entry has no `prompt` string"))?;
    // The prompt text may itself carry ` --` options.
    let mut parsed = parse_prompt_line(prompt);
    let uint = |key: &str| object.get(key).and_then(|v| v.as_u64()).map(|v| v as usize);
    let float = |key: &str| object.get(key).and_then(|v| v.as_f64());
    if let Some(n) = object.get("negative_prompt").and_then(|v| v.as_str()) {
        parsed.negative_prompt = Some(n.to_string());
    }
    parsed.width = uint("width").or(parsed.width);
    parsed.height = uint("height").or(parsed.height);
    if let Some(seed) = object.get("seed").and_then(|v| v.as_u64()) {
        parsed.seeds = vec![seed];
    }
    parsed.scale = float("scale").or(float("guidance_scale")).or(parsed.scale);
    parsed.steps = uint("sample_steps")
        .map(|s| s.clamp(1, 1000))
        .or(parsed.steps);
    if let Some(sampler) = object.get("sample_sampler").and_then(|v| v.as_str()) {
        parsed.sampler = Some(sampler.to_string());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_line_options_as_sd_scripts_reads_them() {
        let line = parse_prompt_line(
            "a cat, (smiling:1.2) --n lowres, bad anatomy --w 640 --h 384 --d 7,8 --l 6.5 --s 30 \
             --ss euler_a --am 0.5 --xyz 3",
        );
        assert_eq!(line.prompt, "a cat, (smiling:1.2)");
        assert_eq!(line.negative_prompt.as_deref(), Some("lowres, bad anatomy"));
        assert_eq!((line.width, line.height), (Some(640), Some(384)));
        assert_eq!(line.seeds, [7, 8]);
        assert_eq!(line.scale, Some(6.5));
        assert_eq!(line.steps, Some(30));
        assert_eq!(line.sampler.as_deref(), Some("euler_a"));
        assert_eq!(line.network_muls, [0.5]);
        assert_eq!(line.ignored, ["--xyz 3"]);
        assert_eq!(parse_prompt_line("x --s 5000").steps, Some(1000));
        assert_eq!(parse_prompt_line("x --G 3").scale, Some(3.0));
    }

    #[test]
    fn prompt_files_in_every_format() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("p.txt");
        std::fs::write(&txt, "# comment\n\na dog --w 256\nа cat\n").unwrap();
        let lines = read_prompt_file(&txt).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].width, Some(256));

        let toml = dir.path().join("p.toml");
        std::fs::write(
            &toml,
            "[prompt]\nwidth = 320\nsample_steps = 12\n\n[[prompt.subset]]\nprompt = \"a dog\"\n\
             negative_prompt = \"blurry\"\n\n[[prompt.subset]]\nprompt = \"a cat\"\nwidth = 256\nseed = 3\n",
        )
        .unwrap();
        let lines = read_prompt_file(&toml).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].negative_prompt.as_deref(), Some("blurry"));
        assert_eq!((lines[0].width, lines[0].steps), (Some(320), Some(12)));
        assert_eq!(
            (lines[1].width, lines[1].seeds.clone()),
            (Some(256), vec![3])
        );

        let json = dir.path().join("p.json");
        std::fs::write(&json, r#"[{"prompt": "a dog --h 192", "scale": 4.5}]"#).unwrap();
        let lines = read_prompt_file(&json).unwrap();
        assert_eq!((lines[0].height, lines[0].scale), (Some(192), Some(4.5)));
    }
}
