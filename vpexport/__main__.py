from vpexport.cli import main

main()
