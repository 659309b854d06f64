from cvit_bench.cli import app

app()
