declare _under='u'
declare big=0
declare bigFloat=-2147483648
declare builder='/bin/sh'
declare ctrl='abcde	'
declare -a emptyList=()
declare -A emptySet=()
declare f=
declare -A flat=(['a']=1 ['b c']='d'\''e' ['n']='' ['z']= )
declare -a impureEnvVars=('PLAN_ORACLE_SET' )
declare integralFloat=3
declare maxInt=-1
declare n=''
declare name='plan-oracle-structured'
declare neg=-5
declare negBigFloat=-2147483648
declare -A outputs=(['dev']='/nix/store/wl8y3cyx34a2lgbarf33gfwrb9rn027w-plan-oracle-structured-dev' ['out']='/nix/store/6dn2w0nn71jsng17snfmmc4a958wyyla-plan-oracle-structured' )
declare -a passAsFile=('q' )
declare ph='/nix/store/6dn2w0nn71jsng17snfmmc4a958wyyla-plan-oracle-structured'
declare phDev='/nix/store/wl8y3cyx34a2lgbarf33gfwrb9rn027w-plan-oracle-structured-dev/lib'
declare q='it'\''s'
declare roundedFloat=123457000
declare -a scalars=(1  '' 1 'x'\''y' 3 )
declare system='x86_64-linux'
declare t=1
declare unicode='é'
declare wrap=-1
