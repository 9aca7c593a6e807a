"""compress_export.formats in a source checkout: its modules live in the top-level formats/ folder.

The project keeps formats/ at the top level, where a regular package (one with __init__.py) would shadow any installed
package of the same name for code run from the checkout. So formats/ has no __init__.py, and this file, which exists
only in the checkout, points the subpackage at it. An installed wheel holds the modules in compress_export/formats/
itself, without this file (pyproject.toml maps compress_export.formats to formats/).
"""

import os as _os

__path__ = [_os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), "formats")]
