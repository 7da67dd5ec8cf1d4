//! Every table the CLI prints (`trellis status`, the lab's layout and summary): columns sized
//! to their widest cell, two spaces apart, no borders, no trailing blanks — the kubectl look,
//! laid out by comfy-table.

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, ContentArrangement};

/// A table being filled; [`Table::render`] lays it out.
pub struct Table {
    inner: comfy_table::Table,
    header: bool,
}

impl Table {
    /// A table whose first line is `header`.
    pub fn new(header: &[&str]) -> Self {
        let mut table = Self::without_header();
        table.inner.set_header(header.iter().copied());
        table.header = true;
        table
    }

    /// A table of rows only (a layout rather than a listing).
    pub fn without_header() -> Self {
        let mut inner = comfy_table::Table::new();
        inner
            .load_preset(NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled);
        Self {
            inner,
            header: false,
        }
    }

    pub fn row<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.inner
            .add_row(cells.into_iter().map(|c| c.to_string()).collect::<Vec<_>>());
    }

    pub fn is_empty(&self) -> bool {
        self.inner.row_count() == 0
    }

    /// The table, each line prefixed with `indent`.
    pub fn render(&mut self, indent: &str) -> String {
        let columns = self.inner.column_count();
        for (i, column) in self.inner.column_iter_mut().enumerate() {
            column.set_padding((0, if i + 1 < columns { 2 } else { 0 }));
            column.set_cell_alignment(CellAlignment::Left);
        }
        let mut out = String::new();
        for line in self.inner.lines() {
            // The NOTHING preset still draws the (blank) line under the header.
            if line.trim().is_empty() && self.header {
                continue;
            }
            out.push_str(indent);
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell_and_lines_have_no_trailing_blanks() {
        let mut table = Table::new(&["NODE", "STATE"]);
        table.row(["node-0", "up"]);
        table.row(["a-much-longer-node-name", ""]);
        assert_eq!(
            table.render("  "),
            "  NODE                     STATE\n  node-0                   up\n  a-much-longer-node-name\n"
        );
    }

    #[test]
    fn a_layout_has_no_header() {
        let mut table = Table::without_header();
        table.row(["c1", "10.1.0.0/16"]);
        table.row(["cluster-two", "10.2.0.0/16"]);
        assert_eq!(
            table.render(""),
            "c1           10.1.0.0/16\ncluster-two  10.2.0.0/16\n"
        );
    }
}
