import os

# MindSpore reads its log level at import: keep its INFO/WARNING lines out of test output.
os.environ.setdefault("GLOG_v", "3")
