from customshift.cli import main

main()
