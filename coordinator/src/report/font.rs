//! The font chart text is drawn with.
//!
//! plotters is built with its pure-Rust `ab_glyph` text renderer rather than `ttf` (font-kit),
//! which would link fontconfig and freetype into the `cvdist` binary. ab_glyph draws only fonts
//! registered with it, so the binary carries one: DejaVu Sans (regular, 2.37, from Debian's
//! `fonts-dejavu-core`; its licence, the Bitstream Vera licence with the DejaVu changes in the
//! public domain, allows redistribution and is in `coordinator/assets/fonts/LICENSE`). Charts
//! therefore always have text, on any host and in the minimal container images.
//! `$CVDIST_FONT` may name another .ttf/.otf file (a bold sibling named `<stem>-Bold.<ext>`
//! is used for titles when it exists); if it cannot be used, the built-in font is, with a
//! warning.

use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Environment variable naming a .ttf/.otf file to use instead of the built-in font.
pub const FONT_ENV: &str = "CVDIST_FONT";

/// The family name chart code asks plotters for; we register the chosen font under it.
pub(crate) const FAMILY: &str = "sans-serif";

/// DejaVu Sans, regular (about 740 KiB).
static BUILT_IN: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// What [`FontStatus::Loaded`] names when the built-in font is used.
pub const BUILT_IN_NAME: &str = "DejaVu Sans (built in)";

/// Fonts are a few MB at most; anything bigger is not worth loading for chart labels.
const MAX_FONT_BYTES: u64 = 32 << 20;

/// Whether chart text can be drawn, and with what.
#[derive(Debug, Clone, PartialEq)]
pub enum FontStatus {
    /// Text is drawn with this font: the file named by `$CVDIST_FONT`, or [`BUILT_IN_NAME`].
    /// `warning` is set when `$CVDIST_FONT` could not be used.
    Loaded { font: String, warning: Option<String> },
    /// No usable font: charts have no text. The string says why. Only reachable if the
    /// built-in font itself were refused by the renderer.
    Missing(String),
}

impl FontStatus {
    pub fn is_loaded(&self) -> bool {
        matches!(self, FontStatus::Loaded { .. })
    }

    pub fn warning(&self) -> Option<&str> {
        match self {
            FontStatus::Loaded { warning, .. } => warning.as_deref(),
            FontStatus::Missing(w) => Some(w),
        }
    }
}

static STATUS: OnceLock<FontStatus> = OnceLock::new();

/// Registers the font the first time it is asked; later calls return the same answer.
pub fn font_status() -> &'static FontStatus {
    STATUS.get_or_init(|| choose(std::env::var_os(FONT_ENV).filter(|p| !p.is_empty()).map(PathBuf::from)))
}

/// Registers `env_font` if given and usable, else the built-in font.
fn choose(env_font: Option<PathBuf>) -> FontStatus {
    let mut warning = None;
    if let Some(path) = env_font {
        match register_file(&path) {
            Ok(()) => return FontStatus::Loaded { font: path.display().to_string(), warning: None },
            Err(why) => {
                warning = Some(format!("{FONT_ENV}={}: {why}; using the built-in font instead", path.display()))
            }
        }
    }
    match register_font(FAMILY, FontStyle::Normal, BUILT_IN) {
        Ok(()) => FontStatus::Loaded { font: BUILT_IN_NAME.to_string(), warning },
        Err(_) => {
            let why = "the built-in font could not be loaded: charts are drawn without text".to_string();
            FontStatus::Missing(match warning {
                Some(w) => format!("{w}; {why}"),
                None => why,
            })
        }
    }
}

/// Registers `path` as the regular face, and a bold sibling (for titles) if there is one.
fn register_file(path: &Path) -> Result<(), String> {
    register_face(path, FontStyle::Normal)?;
    if let Some(bold) = bold_sibling(path) {
        // Optional: plotters falls back to the regular face for bold text.
        let _ = register_face(&bold, FontStyle::Bold);
    }
    Ok(())
}

fn register_face(path: &Path, style: FontStyle) -> Result<(), String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > MAX_FONT_BYTES {
        return Err(format!("{len} bytes is too big for a font"));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    // plotters' font table only takes &'static data. This leaks at most two font files once
    // per process (font_status runs once), which is cheaper than re-reading them per chart.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FAMILY, style, bytes).map_err(|_| "not a TrueType/OpenType font".to_string())
}

/// `DejaVuSans.ttf` -> `DejaVuSans-Bold.ttf`, `LiberationSans-Regular.ttf` -> `LiberationSans-Bold.ttf`.
fn bold_sibling(path: &Path) -> Option<PathBuf> {
    let stem = path.file_stem()?.to_str()?;
    let ext = path.extension()?.to_str()?;
    let base = stem.strip_suffix("-Regular").unwrap_or(stem);
    let bold = path.with_file_name(format!("{base}-Bold.{ext}"));
    bold.is_file().then_some(bold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bold_sibling_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("DejaVuSans-Bold.ttf"), b"x").unwrap();
        std::fs::write(dir.path().join("LiberationSans-Bold.ttf"), b"x").unwrap();
        assert_eq!(bold_sibling(&dir.path().join("DejaVuSans.ttf")), Some(dir.path().join("DejaVuSans-Bold.ttf")));
        assert_eq!(
            bold_sibling(&dir.path().join("LiberationSans-Regular.ttf")),
            Some(dir.path().join("LiberationSans-Bold.ttf"))
        );
        assert_eq!(bold_sibling(&dir.path().join("Other.ttf")), None);
    }

    #[test]
    fn built_in_font_is_used_without_or_despite_a_bad_override() {
        assert_eq!(choose(None), FontStatus::Loaded { font: BUILT_IN_NAME.to_string(), warning: None });
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.ttf");
        std::fs::write(&bad, b"not a font").unwrap();
        let status = choose(Some(bad.clone()));
        assert!(status.is_loaded());
        let w = status.warning().unwrap();
        assert!(
            w.contains(&format!("{FONT_ENV}={}: not a TrueType/OpenType font; using the built-in font", bad.display())),
            "{w}"
        );
        let missing = choose(Some(dir.path().join("nope.ttf")));
        assert!(missing.is_loaded() && missing.warning().unwrap().contains("nope.ttf"));
    }

    #[test]
    fn override_font_is_used_when_it_loads() {
        // The built-in bytes written to a file stand in for a user's font.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Mine.ttf");
        std::fs::write(&path, BUILT_IN).unwrap();
        assert_eq!(choose(Some(path.clone())), FontStatus::Loaded { font: path.display().to_string(), warning: None });
    }
}
