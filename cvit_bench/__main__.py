from cvit_bench.cli import main

main()
