"""Results -> tables: the headline table (markdown, csv, LaTeX) with its rows, gains and notes."""
