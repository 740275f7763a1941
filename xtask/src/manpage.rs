//! p25-policy(5) from docs/policy.md: a small Markdown-to-roff converter, so that the man
//! page and the documentation are one text and packaging needs no pandoc.
//!
//! It handles what docs/policy.md uses: `#`/`##`/`###` headings, paragraphs, fenced code
//! blocks, pipe tables (each row becomes a tagged paragraph: the first cell is the tag, the
//! other cells follow as `header: cell` lines), `-` lists, inline code, bold and links
//! (the link text is kept, the target dropped).

/// Renders `markdown` as a man page `name(section)`, with `summary` on its NAME line.
pub fn render(markdown: &str, name: &str, section: &str, summary: &str, date: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        ".TH {} {section} {date} \"p25 {}\" \"p25 manual\"\n",
        name.to_uppercase(),
        env!("CARGO_PKG_VERSION")
    ));
    out.push_str(&format!(
        ".SH NAME\n{} \\- {}\n.SH DESCRIPTION\n",
        escape(name),
        inline(summary)
    ));
    let lines: Vec<&str> = markdown.lines().collect();
    let mut i = 0;
    let mut seen_title = false;
    while let Some(&line) = lines.get(i) {
        i += 1;
        if let Some(title) = line.strip_prefix("# ") {
            // The document title is the NAME line; a later one is a section.
            if seen_title {
                out.push_str(&format!(".SH {}\n", escape(&title.to_uppercase())));
            }
            seen_title = true;
        } else if let Some(title) = line.strip_prefix("## ") {
            out.push_str(&format!(".SH {}\n", inline(&title.to_uppercase())));
        } else if let Some(title) = line.strip_prefix("### ") {
            out.push_str(&format!(".SS {}\n", inline(title)));
        } else if line.starts_with("```") {
            out.push_str(".PP\n.nf\n.RS 4\n");
            while let Some(&code) = lines.get(i) {
                i += 1;
                if code.starts_with("```") {
                    break;
                }
                out.push_str(&text_line(&escape(code)));
            }
            out.push_str(".RE\n.fi\n");
        } else if line.starts_with('|') {
            let header = cells(line);
            // The separator row (`| --- |`).
            i += 1;
            while let Some(&row) = lines.get(i).filter(|l| l.starts_with('|')) {
                i += 1;
                let row = cells(row);
                let mut cells = row.iter();
                out.push_str(&format!(
                    ".TP\n{}\n",
                    text(&inline(cells.next().map_or("", String::as_str)))
                ));
                for (head, cell) in header.iter().skip(1).zip(cells) {
                    out.push_str(&text_line(&format!("{}: {}", inline(head), inline(cell))));
                    out.push_str(".br\n");
                }
            }
        } else if let Some(item) = line.strip_prefix("- ") {
            out.push_str(".IP \\(bu 2\n");
            out.push_str(&text_line(&inline(item)));
        } else if line.trim().is_empty() {
            out.push_str(".PP\n");
        } else {
            out.push_str(&text_line(&inline(line.trim_start())));
        }
    }
    out.push_str(".SH SEE ALSO\n\\fBp25d\\fR(8), \\fBp25ctl\\fR(8)\n");
    out
}

/// The cells of a pipe-table row, trimmed.
fn cells(row: &str) -> Vec<String> {
    let row = row.trim().trim_start_matches('|').trim_end_matches('|');
    row.split('|').map(|c| c.trim().to_owned()).collect()
}

/// One line of text, protected from being read as a roff request.
fn text_line(line: &str) -> String {
    format!("{}\n", text(line))
}

fn text(line: &str) -> String {
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line.to_owned()
    }
}

/// Escapes roff's escape character.
fn escape(text: &str) -> String {
    text.replace('\\', "\\e")
}

/// Inline Markdown: `code` and **bold** become bold (code with real minus signs), a link
/// keeps its text.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(tail) = rest.strip_prefix("``")
            && let Some(end) = tail.find("``")
        {
            out.push_str(&code(tail.get(..end).unwrap_or_default().trim()));
            rest = tail.get(end + 2..).unwrap_or_default();
        } else if let Some(tail) = rest.strip_prefix('`')
            && let Some(end) = tail.find('`')
        {
            out.push_str(&code(tail.get(..end).unwrap_or_default()));
            rest = tail.get(end + 1..).unwrap_or_default();
        } else if let Some(tail) = rest.strip_prefix("**")
            && let Some(end) = tail.find("**")
        {
            out.push_str(&format!(
                "\\fB{}\\fR",
                escape(tail.get(..end).unwrap_or_default())
            ));
            rest = tail.get(end + 2..).unwrap_or_default();
        } else if let Some(tail) = rest.strip_prefix('[')
            && let Some(close) = tail.find("](")
            && let Some(end) = tail.get(close..).and_then(|t| t.find(')'))
        {
            out.push_str(&inline(tail.get(..close).unwrap_or_default()));
            rest = tail.get(close + end + 1..).unwrap_or_default();
        } else {
            out.push_str(&escape(&c.to_string()));
            rest = rest.get(c.len_utf8()..).unwrap_or_default();
        }
    }
    out
}

fn code(text: &str) -> String {
    format!("\\fB{}\\fR", escape(text).replace('-', "\\-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_headings_tables_code_and_inline_markup() {
        let md = "# Title\n\nIntro with `a-b`, **bold** and [a link](x.md).\n\n## Fields\n\n\
                  | field | default |\n| --- | --- |\n| `mode` | `enforce` |\n\n\
                  ```yaml\n.dot: 1\n```\n- item\n";
        let page = render(md, "p25-policy", "5", "the policy", "2026-12-04");
        assert!(page.starts_with(".TH P25-POLICY 5 2026-12-04"), "{page}");
        assert!(
            page.contains(".SH NAME\np25-policy \\- the policy\n"),
            "{page}"
        );
        assert!(
            page.contains("Intro with \\fBa\\-b\\fR, \\fBbold\\fR and a link."),
            "{page}"
        );
        assert!(page.contains(".SH FIELDS\n"), "{page}");
        assert!(
            page.contains(".TP\n\\fBmode\\fR\ndefault: \\fBenforce\\fR\n.br\n"),
            "{page}"
        );
        assert!(
            page.contains(".nf\n.RS 4\n\\&.dot: 1\n.RE\n.fi\n"),
            "{page}"
        );
        assert!(page.contains(".IP \\(bu 2\nitem\n"), "{page}");
        assert!(
            !page.contains("Title"),
            "the title is the NAME line: {page}"
        );
    }
}
