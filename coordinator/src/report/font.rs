//! Finding a font for chart text at runtime.
//!
//! plotters is built with its pure-Rust `ab_glyph` text renderer rather than `ttf` (font-kit),
//! which would link fontconfig and freetype into the `cvdist` binary. ab_glyph draws only fonts
//! registered with it, so we look for a TrueType/OpenType file in the usual places
//! (on Debian: `apt-get install fonts-dejavu-core`), or in `$CVDIST_FONT`. Without one, charts
//! are still drawn (lines, axes, grid) but carry no text, and the caller gets a warning.

use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Environment variable naming a .ttf/.otf file to use instead of the system search.
pub const FONT_ENV: &str = "CVDIST_FONT";

/// The family name chart code asks plotters for; we register the found font under it.
pub(crate) const FAMILY: &str = "sans-serif";

/// Regular-weight sans fonts in the places common systems install them, most preferred first.
const CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", // Debian/Ubuntu: fonts-dejavu-core
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",          // older Fedora/RHEL
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf", // Fedora
    "/usr/share/fonts/TTF/DejaVuSans.ttf",             // Arch
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf", // Debian: fonts-liberation
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf", // Fedora
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf", // macOS
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Directories scanned when no candidate exists, e.g. a distribution that puts fonts elsewhere.
const SCAN_DIRS: &[&str] = &["/usr/share/fonts", "/usr/local/share/fonts"];

/// Fonts are a few MB at most; anything bigger is not worth loading for chart labels.
const MAX_FONT_BYTES: u64 = 32 << 20;

/// Whether chart text can be drawn, and with what.
#[derive(Debug, Clone, PartialEq)]
pub enum FontStatus {
    /// Text is drawn with this font. `warning` is set when `$CVDIST_FONT` could not be used.
    Loaded { path: PathBuf, warning: Option<String> },
    /// No usable font: charts have no text. The string says why and how to fix it.
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

/// Finds and registers a font the first time it is asked; later calls return the same answer.
pub fn font_status() -> &'static FontStatus {
    STATUS.get_or_init(find_and_register)
}

fn find_and_register() -> FontStatus {
    let mut warning = None;
    if let Some(path) = std::env::var_os(FONT_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        match register(&path) {
            Ok(()) => return FontStatus::Loaded { path, warning: None },
            Err(why) => warning = Some(format!("{FONT_ENV}={}: {why}; using a system font instead", path.display())),
        }
    }
    let scanned = SCAN_DIRS.iter().flat_map(|d| scan(Path::new(d)));
    for path in CANDIDATES.iter().map(PathBuf::from).chain(scanned) {
        if path.is_file() && register(&path).is_ok() {
            return FontStatus::Loaded { path, warning };
        }
    }
    let mut msg = format!(
        "no font found (looked for DejaVuSans.ttf and other sans fonts under /usr/share/fonts): \
         charts are drawn without text; install one (Debian/Ubuntu: apt-get install fonts-dejavu-core) \
         or set {FONT_ENV} to a .ttf file"
    );
    if let Some(w) = warning {
        msg = format!("{w}; {msg}");
    }
    FontStatus::Missing(msg)
}

/// Registers `path` as the regular face, and a bold sibling (for titles) if there is one.
fn register(path: &Path) -> Result<(), String> {
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

/// Font files under `dir` (a few levels deep), plainest sans faces first: a regular sans is
/// what chart labels want, and bold/italic/mono faces read worse.
fn scan(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk(dir, 4, &mut found);
    found.sort_by_key(|p| (plainness_penalty(p), p.clone()));
    found
}

fn walk(dir: &Path, depth: u32, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if depth > 0 {
                walk(&path, depth - 1, found);
            }
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("ttf") || e.eq_ignore_ascii_case("otf"))
        {
            found.push(path);
        }
    }
}

fn plainness_penalty(path: &Path) -> u32 {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let mut penalty = 0;
    if !name.contains("sans") {
        penalty += 10;
    }
    for styled in ["bold", "italic", "oblique", "mono", "light", "thin", "condensed", "black", "serif"] {
        // "sans" contains no style word; "serif" alone (not "sans-serif") marks a serif face.
        if name.contains(styled) && !(styled == "serif" && name.contains("sans")) {
            penalty += 1;
        }
    }
    penalty
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
    fn plain_sans_ranks_first() {
        let mut v = [
            PathBuf::from("/f/DejaVuSerif.ttf"),
            PathBuf::from("/f/DejaVuSans-Bold.ttf"),
            PathBuf::from("/f/DejaVuSansMono.ttf"),
            PathBuf::from("/f/DejaVuSans.ttf"),
        ];
        v.sort_by_key(|p| (plainness_penalty(p), p.clone()));
        assert_eq!(v[0], PathBuf::from("/f/DejaVuSans.ttf"));
        assert_eq!(v[3], PathBuf::from("/f/DejaVuSerif.ttf"));
    }
}
