//! Diagnostics: what every front-end stage returns instead of failing.
//!
//! A stage collects all the problems it finds into a `Vec<Diagnostic>`; the
//! CLI renders them with codespan-reporting as `file:line:col`, the source
//! line and a caret under the span.

use crate::ir::Span;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem in the source, with where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// One sentence: what is wrong.
    pub message: String,
    pub span: Span,
    /// Secondary places (`first bound here`), each with a short label.
    pub related: Vec<(Span, String)>,
    /// How to fix it, where that helps.
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            span,
            related: Vec::new(),
            help: None,
        }
    }

    pub fn warning(span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(span, message)
        }
    }

    pub fn with_related(mut self, span: Span, label: impl Into<String>) -> Self {
        self.related.push((span, label.into()));
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The source files of one compilation; `Span::file` indexes into it.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    pub files: Vec<SourceFile>,
}

#[derive(Clone, Debug)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

impl SourceMap {
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> u32 {
        self.files.push(SourceFile {
            name: name.into(),
            text: text.into(),
        });
        (self.files.len() - 1) as u32
    }

    pub fn get(&self, file: u32) -> Option<&SourceFile> {
        self.files.get(file as usize)
    }

    /// 1-based `(line, column)` of a byte offset (column counts chars).
    pub fn line_col(&self, file: u32, offset: u32) -> (usize, usize) {
        let Some(f) = self.get(file) else {
            return (1, 1);
        };
        let offset = (offset as usize).min(f.text.len());
        let before = &f.text[..floor_char_boundary(&f.text, offset)];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The byte range of `span` inside `text`, clamped to the text and widened
/// to char boundaries, so a stale or hostile span can never make a slice
/// panic inside the renderer.
fn clamp_range(text: &str, span: Span) -> std::ops::Range<usize> {
    let start = floor_char_boundary(text, (span.start as usize).min(text.len()));
    let mut end = (span.end as usize).clamp(start, text.len());
    while end < text.len() && !text.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

/// `file:line:col: error: message` — one line per diagnostic, for tests and
/// terse output.
pub fn one_line(d: &Diagnostic, sources: &SourceMap) -> String {
    let name = sources
        .get(d.span.file)
        .map_or("<unknown>", |f| f.name.as_str());
    let (line, col) = sources.line_col(d.span.file, d.span.start);
    let sev = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    format!("{name}:{line}:{col}: {sev}: {}", d.message)
}

/// Renders diagnostics the way the CLI prints them: severity and message,
/// `file:line:col`, the source line with `^^^` under the span, related
/// places as secondary labels and `help` as a note. Plain text, no colours.
pub fn render(diags: &[Diagnostic], sources: &SourceMap) -> String {
    use codespan_reporting::diagnostic::{
        Diagnostic as CsDiagnostic, Label, Severity as CsSeverity,
    };
    use codespan_reporting::files::SimpleFiles;
    use codespan_reporting::term::{self, termcolor::NoColor, Chars, Config};

    let mut files = SimpleFiles::new();
    for f in &sources.files {
        files.add(f.name.as_str(), f.text.as_str());
    }
    let config = Config {
        chars: Chars::ascii(),
        ..Config::default()
    };
    let label = |span: Span, primary: bool| -> Option<Label<usize>> {
        let f = sources.get(span.file)?;
        let range = clamp_range(&f.text, span);
        let id = span.file as usize;
        Some(if primary {
            Label::primary(id, range)
        } else {
            Label::secondary(id, range)
        })
    };

    let mut out = NoColor::new(Vec::new());
    for d in diags {
        let severity = match d.severity {
            Severity::Error => CsSeverity::Error,
            Severity::Warning => CsSeverity::Warning,
        };
        let mut labels = Vec::new();
        let mut notes = Vec::new();
        match label(d.span, true) {
            Some(l) => labels.push(l),
            // A span into a file the map does not hold still gets its
            // message printed rather than being dropped.
            None => notes.push(format!("at {}", one_line(d, sources))),
        }
        for (span, text) in &d.related {
            match label(*span, false) {
                Some(l) => labels.push(l.with_message(text.clone())),
                None => notes.push(text.clone()),
            }
        }
        if let Some(h) = &d.help {
            notes.push(format!("help: {h}"));
        }
        let cs = CsDiagnostic::new(severity)
            .with_message(d.message.clone())
            .with_labels(labels)
            .with_notes(notes);
        if term::emit(&mut out, &config, &files, &cs).is_err() {
            // The renderer refused (it should not, spans are clamped): fall
            // back to the one-line form so the message is never lost.
            let mut v = std::mem::take(out.get_mut());
            v.extend_from_slice(one_line(d, sources).as_bytes());
            v.push(b'\n');
            *out.get_mut() = v;
        }
    }
    String::from_utf8_lossy(&out.into_inner()).into_owned()
}
