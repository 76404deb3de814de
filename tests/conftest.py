import sys
from pathlib import Path

# The reference implementations in tests/references.py are imported by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
