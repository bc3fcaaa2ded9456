//! Where each value of a YAML document is written, so that a config error found after
//! parsing (a duplicate port, a bad template path) names the line it is on.
//!
//! serde_yaml gives positions for its own errors only. This walks the parser's events
//! (`saphyr-parser`, which reports a span per event) and records the line of every key
//! and sequence item under a path such as `app-servers.workset[1].numprocs[2]`.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};

/// The line (1-based) of every path in a document.
#[derive(Debug, Default)]
pub struct Lines {
    lines: HashMap<String, usize>,
}

enum Frame {
    Map {
        path: String,
        /// The key whose value comes next; `None` while a key is expected.
        key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Lines {
    /// Indexes the first document of `text`. A document the parser refuses yields what
    /// was read before the error (serde_yaml reports the error itself).
    pub fn index(text: &str) -> Lines {
        let mut lines = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for event in Parser::new_from_str(text) {
            let Ok((event, span)) = event else { break };
            let line = span.start.line();
            match event {
                Event::Scalar(value, ..) => match stack.last_mut() {
                    // A key: index it and wait for its value.
                    Some(Frame::Map { path, key }) if key.is_none() => {
                        lines.entry(join(path, &value)).or_insert(line);
                        *key = Some(value.into_owned());
                    }
                    // A value: its key's line is recorded.
                    Some(Frame::Map { key, .. }) => *key = None,
                    Some(Frame::Seq { path, next }) => {
                        lines.entry(format!("{path}[{next}]")).or_insert(line);
                        *next += 1;
                    }
                    None => {}
                },
                Event::Alias(_) => match stack.last_mut() {
                    // An alias as a key has no name to index; as a value it ends the entry.
                    Some(Frame::Map { key, .. }) if key.is_none() => *key = Some(String::new()),
                    Some(Frame::Map { key, .. }) => *key = None,
                    Some(Frame::Seq { next, .. }) => *next += 1,
                    None => {}
                },
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    let path = match stack.last_mut() {
                        Some(Frame::Map { path, key }) => match key.take() {
                            Some(key) => join(path, &key),
                            // A collection used as a key: nothing below it is a config key.
                            None => join(path, "?"),
                        },
                        Some(Frame::Seq { path, next }) => {
                            let item = format!("{path}[{next}]");
                            lines.entry(item.clone()).or_insert(line);
                            *next += 1;
                            item
                        }
                        None => String::new(),
                    };
                    stack.push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Map { path, key: None }
                    } else {
                        Frame::Seq { path, next: 0 }
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                Event::DocumentEnd => break,
                _ => {}
            }
        }
        Lines { lines }
    }

    /// The line of `path`, or of the nearest enclosing value that is written down
    /// (a default that was left out has no line of its own).
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(&line) = self.lines.get(path) {
                return Some(line);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
listen: 127.0.0.1:80
app-servers:
  cmd: 'app {port}'
  workset:
    - numprocs: [8001, 8002]
    - numprocs:
        - 8501
        - 8502
  health: {path: /, timeout: soon}
  after_start:
    - replace_file: [numprocs, a, b]
    - run_proc: x
";

    #[test]
    fn every_key_and_item_has_its_own_line() {
        let lines = Lines::index(DOC);
        assert_eq!(lines.line("listen"), Some(1));
        assert_eq!(lines.line("app-servers.cmd"), Some(3));
        assert_eq!(lines.line("app-servers.workset[0].numprocs[1]"), Some(5));
        assert_eq!(lines.line("app-servers.workset[1].numprocs"), Some(6));
        assert_eq!(lines.line("app-servers.workset[1].numprocs[1]"), Some(8));
        assert_eq!(lines.line("app-servers.health.timeout"), Some(9));
        assert_eq!(lines.line("app-servers.after_start[1].run_proc"), Some(12));
    }

    #[test]
    fn a_missing_path_takes_the_line_of_what_encloses_it() {
        let lines = Lines::index(DOC);
        assert_eq!(lines.line("app-servers.health.interval"), Some(9));
        assert_eq!(lines.line("app-servers.stop_timeout"), Some(2));
        assert_eq!(lines.line("nothing"), None);
    }
}
