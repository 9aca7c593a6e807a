"""Print README.md's table of COMPRESS_EXPORT_* settings, generated from compress_export/core/settings.py.

Paste the output between the `<!-- settings-table:begin -->` and `<!-- settings-table:end -->` markers in README.md;
tests/test_settings.py fails while the two differ.
"""

from compress_export.core.settings import markdown_table

if __name__ == "__main__":
    print(markdown_table(), end="")
