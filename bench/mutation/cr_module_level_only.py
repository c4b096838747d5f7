"""Keep only the cosmic-ray mutants that mutmut cannot make: those outside every function body (module-level tables
and constants, class-level defaults, decorators). The rest of the session is marked skipped (mutmut covers it).

    python bench/mutation/cr_module_level_only.py SESSION.sqlite SOURCE.py
"""

import ast
import sqlite3
import sys

session, source = sys.argv[1:3]
tree = ast.parse(open(source).read())
bodies = [(n.lineno, n.end_lineno) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
db = sqlite3.connect(session)
jobs = db.execute("select job_id, start_pos_row from mutation_specs").fetchall()
inside = [job for job, row in jobs if any(a <= row <= b for a, b in bodies)]
db.executemany("insert or replace into work_results (worker_outcome, output, test_outcome, diff, job_id) "
               "values ('SKIPPED', 'inside a function: mutmut', NULL, '', ?)", [(j,) for j in inside])
db.commit()
print(f"{len(jobs)} mutants, {len(jobs) - len(inside)} outside function bodies kept, {len(inside)} skipped")
