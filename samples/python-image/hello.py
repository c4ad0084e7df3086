import os
import platform

print(os.environ.get("GREETING", "hello"), "on Python", platform.python_version())
