//! Charts, table and confusion matrix from synthetic run directories.

use cvdist_common::proto::{EpochMetrics, JobSpec};
use cvdist_common::run_dir::{self, Summary};
use cvdist_coordinator::report::{
    self, font_status, load_run, series_colour, summary_table, write_charts, write_charts_with, write_confusion_matrix,
    ChartOptions, ReportError, Run,
};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const BACKGROUND: [u8; 3] = [255, 255, 255];

/// A run that learns: loss falls, accuracy rises towards `peak` (best at `best_epoch`, 0-based).
/// Every curve depends on `peak` and `world`, so two runs' lines do not hide each other.
fn history(epochs: u32, peak: f64, best_epoch: u32, world: u32) -> Vec<EpochMetrics> {
    (0..epochs)
        .map(|e| {
            let t = (e + 1) as f64 / epochs as f64;
            let test_acc = if e == best_epoch { peak } else { peak * (0.55 + 0.4 * t).min(0.97) };
            EpochMetrics {
                epoch: e,
                train_loss: 2.3 * (1.0 - peak * t),
                train_acc: (0.3 + (peak + 0.1) * t * 0.8).min(0.99),
                test_loss: 2.1 * (1.0 - peak * 0.8 * t),
                test_acc,
                lr: 0.05 * world as f64 * (1.0 - t) + 0.001,
                seconds: 10.0 + e as f64,
                images_per_sec: 1000.0 * world as f64 + 100.0 * e as f64,
                world_size: world,
                allreduce_seconds: 0.5,
                attempt: 0,
            }
        })
        .collect()
}

fn write_run(root: &Path, dir: &str, name: &str, model: &str, metrics: &[EpochMetrics], restarts: u32) -> PathBuf {
    let dir = root.join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = JobSpec { name: name.into(), model: model.into(), epochs: metrics.len() as u32, ..Default::default() };
    run_dir::write_job(&dir, &spec).unwrap();
    run_dir::write_metrics(&dir, metrics).unwrap();
    let mut summary = Summary::from_history(metrics);
    summary.model = model.into();
    summary.restarts = restarts;
    run_dir::write_summary(&dir, &summary).unwrap();
    dir
}

fn two_runs(root: &Path) -> Vec<Run> {
    let a = write_run(root, "job-a", "baseline", "resnet18", &history(6, 0.82, 4, 2), 0);
    let b = write_run(root, "job-b", "wide", "wrn16_4", &history(6, 0.88, 3, 4), 1);
    vec![load_run(&a).unwrap(), load_run(&b).unwrap()]
}

struct Image {
    width: u32,
    height: u32,
    /// RGB triples, row-major.
    pixels: Vec<[u8; 3]>,
}

fn decode(path: &Path) -> Image {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "{}", path.display());
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("{}: unexpected colour type {other:?}", path.display()),
    };
    let pixels = buf[..info.buffer_size()].chunks(channels).map(|p| [p[0], p[1], p[2]]).collect();
    Image { width: info.width, height: info.height, pixels }
}

impl Image {
    fn count(&self, colour: [u8; 3]) -> usize {
        self.pixels.iter().filter(|p| **p == colour).count()
    }
    fn distinct_colours(&self) -> usize {
        self.pixels.iter().collect::<HashSet<_>>().len()
    }
    fn non_background_fraction(&self) -> f64 {
        (self.pixels.len() - self.count(BACKGROUND)) as f64 / self.pixels.len() as f64
    }
}

fn rgb(c: (u8, u8, u8)) -> [u8; 3] {
    [c.0, c.1, c.2]
}

#[test]
fn charts_overlay_two_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = two_runs(tmp.path());
    let out = tmp.path().join("report");
    let rendered = write_charts(&runs, &out).unwrap();

    let names: Vec<_> = rendered.files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["loss.png", "accuracy.png", "lr.png", "throughput.png"]);
    // The built-in font is always there: charts have text and no font warning (unless
    // $CVDIST_FONT names an unusable file).
    assert!(font_status().is_loaded(), "{:?}", font_status());
    assert_eq!(rendered.warnings.is_empty(), font_status().warning().is_none());

    for path in &rendered.files {
        assert!(path.starts_with(&out));
        let img = decode(path);
        assert_eq!((img.width, img.height), (1000, 600), "{}", path.display());
        let fraction = img.non_background_fraction();
        assert!(fraction > 0.01, "{}: only {fraction} of pixels drawn", path.display());
        assert!(img.distinct_colours() >= 8, "{}: {} colours", path.display(), img.distinct_colours());
        for run in 0..2 {
            let n = img.count(rgb(series_colour(run)));
            assert!(n > 150, "{}: run {run}'s colour on only {n} pixels", path.display());
        }
    }
    // Text is anti-aliased, so a chart with text has many grey levels on top of the lines.
    assert!(decode(&out.join("loss.png")).distinct_colours() > 50);
}

#[test]
fn charts_without_text_still_draw() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = two_runs(tmp.path());
    let out = tmp.path().join("plain");
    let opts = ChartOptions { size: (640, 400), text: false };
    let rendered = write_charts_with(&runs, &out, &opts).unwrap();
    assert_eq!(rendered.files.len(), 4);
    for path in &rendered.files {
        let img = decode(path);
        assert_eq!((img.width, img.height), (640, 400));
        assert!(img.count(rgb(series_colour(0))) > 100 && img.count(rgb(series_colour(1))) > 100);
    }
}

#[test]
fn single_run_and_odd_histories() {
    let tmp = tempfile::tempdir().unwrap();
    // One epoch only, and an epoch recorded twice across a restart.
    let mut m = history(3, 0.5, 2, 1);
    let mut rerun = m[1];
    rerun.attempt = 1;
    rerun.test_acc = 0.45;
    m.push(rerun);
    let dir = write_run(tmp.path(), "odd", "", "resnet18", &m, 1);
    let one = write_run(tmp.path(), "one", "", "resnet18", &history(1, 0.3, 0, 1), 0);
    for d in [&dir, &one] {
        let run = load_run(d).unwrap();
        let rendered = write_charts(std::slice::from_ref(&run), &tmp.path().join("out")).unwrap();
        assert_eq!(rendered.files.len(), 4);
    }
    let run = load_run(&dir).unwrap();
    assert_eq!(run.label, "resnet18 (odd)", "no job name: model and directory name");
    let epochs = run.epochs();
    assert_eq!(epochs.len(), 3);
    assert_eq!(epochs[1].attempt, 1, "the rerun of an epoch replaces the first record");

    // A diverged run: NaN/inf cannot round-trip through JSON, so build the run in memory.
    let mut diverged = run.clone();
    diverged.metrics[1].train_loss = f64::NAN;
    diverged.metrics[2].test_loss = f64::INFINITY;
    let rendered = write_charts(&[diverged], &tmp.path().join("nan")).unwrap();
    let img = decode(&rendered.files[0]);
    assert!(img.count(rgb(series_colour(0))) > 50);
}

#[test]
fn summary_table_lists_both_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = two_runs(tmp.path());
    let table = summary_table(&runs);
    println!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "header, rule, two runs");
    assert!(lines[0].starts_with("run") && lines[0].contains("best test acc (epoch)"));
    let a = lines.iter().find(|l| l.starts_with("baseline")).expect("baseline row");
    let b = lines.iter().find(|l| l.starts_with("wide")).expect("wide row");
    // Best is epoch index 4 / 3, shown 1-based.
    assert!(a.contains("82.00% (5)"), "{a}");
    assert!(b.contains("88.00% (4)"), "{b}");
    assert!(a.contains("resnet18") && b.contains("wrn16_4"));
    // Columns line up: every row is as long as the rule under the header (right-aligned last column).
    assert!(lines.iter().skip(1).all(|l| l.len() == lines[1].len()), "{table}");
    let restarts: Vec<&str> = lines[2..].iter().map(|l| l.split_whitespace().last().unwrap()).collect();
    assert_eq!(restarts, ["0", "1"]);
}

#[test]
fn duplicate_names_are_disambiguated() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_run(tmp.path(), "first", "same", "resnet18", &history(2, 0.5, 1, 1), 0);
    let b = write_run(tmp.path(), "second", "same", "resnet18", &history(2, 0.6, 1, 1), 0);
    let table = summary_table(&[load_run(&a).unwrap(), load_run(&b).unwrap()]);
    assert!(table.contains("same [first]") && table.contains("same [second]"), "{table}");
}

#[test]
fn bad_run_dirs_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();

    let missing = tmp.path().join("nothing-here");
    let err = load_run(&missing).unwrap_err();
    assert!(matches!(err, ReportError::NotARunDir { .. }));
    assert!(err.to_string().contains("nothing-here"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = load_run(&empty).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl"), "{err}");

    let corrupt = write_run(tmp.path(), "corrupt", "c", "resnet18", &history(3, 0.5, 1, 1), 0);
    let path = corrupt.join(run_dir::METRICS_FILE);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"epoch\": 3, \"train_loss\": \n");
    std::fs::write(&path, text).unwrap();
    let err = load_run(&corrupt).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl") && err.contains("line 4"), "{err}");

    let bad_job = write_run(tmp.path(), "badjob", "j", "resnet18", &history(2, 0.5, 1, 1), 0);
    std::fs::write(bad_job.join(run_dir::JOB_FILE), "{\n \"name\": 7\n}").unwrap();
    let err = load_run(&bad_job).unwrap_err().to_string();
    assert!(err.contains("job.json") && err.contains("line 2"), "{err}");

    assert!(matches!(write_charts(&[], tmp.path()), Err(ReportError::NoRuns)));
}

#[test]
fn confusion_matrix_heatmap() {
    let tmp = tempfile::tempdir().unwrap();
    let names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
    let mut m = [[0u64; 10]; 10];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate() {
            *cell = if i == j { 900 - 10 * i as u64 } else { ((i * 7 + j * 3) % 23) as u64 };
        }
    }
    let out = tmp.path().join("eval/confusion.png");
    let rendered = write_confusion_matrix(&m, &names, &out).unwrap();
    assert_eq!(rendered.files, std::slice::from_ref(&out));
    let img = decode(&out);
    assert_eq!((img.width, img.height), (1000, 920));
    assert!(img.non_background_fraction() > 0.3);
    assert!(img.distinct_colours() > 20);

    // Vec rows work too, and shape errors are reported rather than drawn.
    let v: Vec<Vec<u64>> = vec![vec![3, 1], vec![0, 4]];
    write_confusion_matrix(&v, &["a", "b"], &tmp.path().join("small.png")).unwrap();
    let err = write_confusion_matrix(&v, &["a"], &tmp.path().join("x.png")).unwrap_err();
    assert!(matches!(err, ReportError::Shape(_)), "{err}");
    let ragged: Vec<Vec<u64>> = vec![vec![1, 2], vec![3]];
    assert!(matches!(
        write_confusion_matrix(&ragged, &["a", "b"], &tmp.path().join("y.png")),
        Err(ReportError::Shape(_))
    ));
}

/// Writes the charts somewhere stable to look at by eye:
/// `CVDIST_REPORT_SAMPLE=/tmp/x cargo test -p cvdist-coordinator --test report -- sample`.
#[test]
fn sample_output_for_inspection() {
    let Some(dir) = std::env::var_os("CVDIST_REPORT_SAMPLE") else { return };
    let dir = PathBuf::from(dir);
    let runs = two_runs(&dir.join("runs"));
    let rendered = write_charts(&runs, &dir).unwrap();
    let names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
    let mut m = [[0u64; 10]; 10];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate() {
            *cell = if i == j { 900 - 10 * i as u64 } else { ((i * 7 + j * 3) % 23) as u64 };
        }
    }
    write_confusion_matrix(&m, &names, &dir.join("confusion.png")).unwrap();
    let _ = report::summary_table(&runs);
    println!("{:?}", rendered);
}
