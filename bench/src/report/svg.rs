//! The plot: requests per second over each run, failures and reload starts marked.

use std::fmt::Write;

use super::Row;

const COLORS: [&str; 6] = [
    "#1f77b4", "#7f7f7f", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Successful requests per second per scenario, one panel per kind of load;
/// failures as red marks with their count, reload starts as ticks under each panel.
pub fn svg(rows: &[Row]) -> String {
    let mut modes: Vec<&str> = Vec::new();
    for r in rows {
        if !modes.contains(&r.mode.as_str()) {
            modes.push(&r.mode);
        }
    }
    let (w, left, right) = (1120.0, 70.0, 380.0);
    let plot_w = w - left - right;
    let plot_h = 220.0;
    let tick_row = 7.0;
    let mut s = String::new();
    let mut y0 = 30.0;
    let mut body = String::new();
    for mode in &modes {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.mode == *mode).collect();
        let secs = rs.iter().map(|r| r.series.len()).max().unwrap_or(1).max(1) as f64;
        let ymax = rs
            .iter()
            .flat_map(|r| r.series.iter().map(|p| p.0))
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.1;
        let x = |t: f64| left + plot_w * t / secs;
        let y = |v: f64| y0 + plot_h - plot_h * v / ymax;
        let _ = writeln!(
            body,
            r##"<text x="{left}" y="{:.1}" font-weight="bold">{} — successful requests per second (failures in red, reload/restart starts as ticks below)</text>"##,
            y0 - 8.0,
            esc(mode)
        );
        let _ = writeln!(
            body,
            r##"<rect x="{left}" y="{y0}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>"##
        );
        for k in 0..=4 {
            let v = ymax / 1.1 * k as f64 / 4.0;
            let _ = writeln!(
                body,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{:.0}</text><line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
                left - 4.0,
                y(v) + 3.0,
                v,
                left + plot_w,
                y(v),
                y(v)
            );
        }
        let step = if secs > 60.0 { 10 } else { 5 };
        for t in (0..=secs as usize).step_by(step) {
            let _ = writeln!(
                body,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{t}s</text>"##,
                x(t as f64),
                y0 + plot_h + 12.0 + tick_row * rs.len() as f64
            );
        }
        for (i, r) in rs.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            // The last second is partial: leave it out.
            let n = r.series.len().saturating_sub(1);
            let points: Vec<String> = r.series[..n]
                .iter()
                .enumerate()
                .map(|(t, p)| format!("{:.1},{:.1}", x(t as f64 + 0.5), y(p.0 as f64)))
                .collect();
            let width = if r.is_ally() { 2.0 } else { 1.2 };
            let _ = writeln!(
                body,
                r##"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"##,
                points.join(" ")
            );
            for (t, p) in r.series[..n].iter().enumerate() {
                if p.1 > 0 {
                    let (cx, cy) = (x(t as f64 + 0.5), y(p.0 as f64));
                    let _ = writeln!(
                        body,
                        r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="red" stroke="{color}"><title>{}: {} failed in second {t}</title></circle><text x="{:.1}" y="{:.1}" font-size="9" fill="red">{}</text>"##,
                        esc(&r.scenario),
                        p.1,
                        cx + 4.0,
                        cy - 4.0,
                        p.1
                    );
                }
            }
            let ty = y0 + plot_h + 4.0 + tick_row * i as f64;
            for &m in &r.marks_us {
                let tx = x(m as f64 / 1e6);
                let _ = writeln!(
                    body,
                    r##"<line x1="{tx:.1}" x2="{tx:.1}" y1="{ty:.1}" y2="{:.1}" stroke="{color}"/>"##,
                    ty + tick_row - 2.0
                );
            }
            let ly = y0 + 14.0 + 16.0 * i as f64;
            let _ = writeln!(
                body,
                r##"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{ly:.1}" font-size="11">{} ({} failed)</text>"##,
                left + plot_w + 10.0,
                left + plot_w + 28.0,
                ly - 4.0,
                ly - 4.0,
                left + plot_w + 32.0,
                esc(&r.scenario),
                r.summary.failed
            );
        }
        y0 += plot_h + 40.0 + tick_row * rs.len() as f64 + 20.0;
    }
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{:.0}" font-family="sans-serif" font-size="12">"##,
        y0
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::row;

    #[test]
    fn svg_marks_failures_and_reloads() {
        let rows = vec![
            row("ally reload", 0, vec![1.0], 1),
            row("shellflip", 2, vec![1.0], 1),
        ];
        let svg = svg(&rows);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        // Second 1 has failures in both rows; the last (partial) second is left out.
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("shellflip (2 failed)"));
    }
}
